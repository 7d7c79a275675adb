"""Scenario presets (nnunetv2_cimis/scenarios/presets/*.json): schema, class names taken from the label map of
the dataset's converter (what dataset.json ``labels`` holds), disjoint steps; dataset sequences likewise."""
import json
from pathlib import Path

import pytest

import nnunetv2_cimis.dataset_conversion as dataset_conversion
import nnunetv2_cimis.scenarios as scenarios

PRESETS = Path(scenarios.__file__).parent / "presets"
LABEL_MAPS = Path(dataset_conversion.__file__).parent / "label_maps"
DATASET_FILES = sorted(p for p in PRESETS.glob("*.json") if p.name != "sequences.json")


def label_maps():
    """Dataset name (as presets write it) -> label map."""
    out = {}
    for p in LABEL_MAPS.glob("*.json"):
        lm = json.loads(p.read_text())
        out[lm["dataset"]] = lm
    return out


def class_names(dataset: str):
    """Foreground class names the converter writes for ``dataset`` ("MSD/TaskXX_Name" for an MSD task)."""
    maps = label_maps()
    if dataset.startswith("MSD/"):
        labels = maps["MSD"]["tasks"][dataset.split("/", 1)[1]]["labels"]
    else:
        labels = maps[dataset]["labels"]
    return [n for n in labels if n != "background"]


def test_presets_exist_for_required_datasets():
    assert {p.stem for p in DATASET_FILES} >= {"btcv", "word", "amos", "flare22", "dsad"}
    assert (PRESETS / "sequences.json").is_file()
    btcv = json.loads((PRESETS / "btcv.json").read_text())
    assert set(btcv["scenarios"]) >= {"4-4-5", "7-3-3", "7-6"}
    assert set(json.loads((PRESETS / "word.json").read_text())["scenarios"]) >= {"8-4-4", "8-8"}


@pytest.mark.parametrize("path", DATASET_FILES, ids=lambda p: p.stem)
def test_dataset_preset(path):
    content = json.loads(path.read_text())
    assert set(content) == {"dataset", "description", "scenarios"}
    assert path.stem == content["dataset"].lower()
    names = class_names(content["dataset"])
    assert content["scenarios"]
    for split, entry in content["scenarios"].items():
        assert set(entry) == {"steps", "reference"} and entry["reference"]
        steps = entry["steps"]
        assert len(steps) >= 2 and all(steps), split
        flat = [c for step in steps for c in step]
        unknown = [c for c in flat if c not in names]
        assert not unknown, f"{path.name} {split}: {unknown} not in the label map of {content['dataset']}"
        assert len(flat) == len(set(flat)), f"{path.name} {split}: steps not disjoint"
        if all(ch.isdigit() or ch == "-" for ch in split):  # "4-4-5": the sizes match the name
            assert [len(s) for s in steps] == [int(n) for n in split.split("-")]


def test_label_order_splits_follow_label_values():
    """A MiB-style "4-4-5" preset of BTCV is the label order cut 4/4/5 (hand-written expectation)."""
    steps = json.loads((PRESETS / "btcv.json").read_text())["scenarios"]["4-4-5"]["steps"]
    assert steps == [["spleen", "right kidney", "left kidney", "gallbladder"],
                     ["esophagus", "liver", "stomach", "aorta"],
                     ["inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
                      "left adrenal gland"]]


def test_sequences():
    content = json.loads((PRESETS / "sequences.json").read_text())
    assert set(content) == {"scenarios"} and "flare21-kits19-msd07" in content["scenarios"]
    for name, seq in content["scenarios"].items():
        assert set(seq) == {"steps", "description"} and seq["description"]
        assert len(seq["steps"]) >= 2
        seen = set()
        for step in seq["steps"]:
            assert set(step) <= {"dataset", "classes", "rename"} and step["classes"]
            names = class_names(step["dataset"])
            assert all(c in names for c in step["classes"]), (name, step)
            rename = step.get("rename", {})
            assert set(rename) <= set(step["classes"]), (name, rename)
            global_names = [rename.get(c, c) for c in step["classes"]]
            assert len(global_names) == len(set(global_names))
            assert not seen & set(global_names), f"{name}: {seen & set(global_names)} already learned"
            seen |= set(global_names)


def test_presets_load_through_scenario_parser():
    from nnunetv2_cimis.scenarios.scenario import load_presets
    presets = load_presets()
    assert presets["btcv:4-4-5"]["steps"][0][0] == "spleen"
    assert "word:8-8" in presets and "dsad:6-5" in presets

"""make_scenario without preprocessing (fast): global label space, masks, splits, test set, sequences."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
from nnunetv2_cimis.scenarios.make_scenario import make_scenario


def _labels(path):
    return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(path))).tolist())


def test_explicit_groups_get_global_values_in_scenario_order(roots):
    write_abdominal_phantom(str(roots / "raw"), 300, 8, shape=(16, 16, 16), seed=0)
    summary = make_scenario("300", "spleen;liver,aorta", [301, 302], test_fraction=0.25, preprocess=False)
    assert summary["global_labels"] == {"background": 0, "spleen": 1, "liver": 2, "aorta": 3}
    with open(roots / "raw" / summary["step_datasets"][1] / "dataset.json") as f:
        ds = json.load(f)
    assert ds["labels"] == {"background": 0, "spleen": 1, "liver": 2, "aorta": 3}
    assert ds["cimis"]["old_labels"] == [1] and ds["cimis"]["new_labels"] == [2, 3]
    for files in ds["dataset"].values():
        assert _labels(roots / "raw" / summary["step_datasets"][1] / files["label"]) <= {0, 2, 3}
    with open(roots / "raw" / summary["joint_dataset"] / "dataset.json") as f:
        joint = json.load(f)
    assert len(joint["dataset"]) == sum(summary["cases_per_step"])
    with open(roots / "raw" / summary["step_datasets"][0] / "test_set.json") as f:
        test = json.load(f)
    assert len(test["cases"]) == 2
    for entry in test["cases"].values():  # paths relative to the step-0 folder (portable, as the datasets)
        assert _labels(roots / "raw" / summary["step_datasets"][0] / entry["label"]) <= {0, 1, 2, 3}
        assert entry["annotated_labels"] == [1, 2, 3]


def test_dataset_sequence_from_a_json_file(roots):
    write_abdominal_phantom(str(roots / "raw"), 310, 6, shape=(16, 16, 16), seed=1, organs=["liver", "spleen"],
                            dataset_name="A")
    write_abdominal_phantom(str(roots / "raw"), 311, 6, shape=(16, 16, 16), seed=2, organs=["aorta", "liver"],
                            dataset_name="B")
    spec = roots / "seq.json"
    spec.write_text(json.dumps({"steps": [{"dataset": "A", "classes": ["liver", "spleen"]},
                                          {"dataset": "B", "classes": ["aorta"]}]}))
    summary = make_scenario(["310", "311"], str(spec), [320, 321], preprocess=False)
    assert summary["global_labels"] == {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}
    with open(roots / "raw" / summary["step_datasets"][1] / "dataset.json") as f:
        step1 = json.load(f)
    assert all(c.startswith("s1_") for c in step1["dataset"])  # patients of dataset B only
    for files in step1["dataset"].values():  # B's liver is an old class: background here
        assert _labels(roots / "raw" / summary["step_datasets"][1] / files["label"]) <= {0, 3}
    with open(roots / "raw" / summary["step_datasets"][0] / "test_set.json") as f:
        test = json.load(f)
    annotated = {c[:3]: e["annotated_labels"] for c, e in test["cases"].items()}
    assert annotated == {"s0_": [1, 2], "s1_": [3]}  # each test case is scored on what its dataset labels
    # a class learned twice is refused, and nothing is written
    spec.write_text(json.dumps({"steps": [{"dataset": "A", "classes": ["liver"]},
                                          {"dataset": "B", "classes": ["liver"]}]}))
    with pytest.raises(CIMISError, match="learned twice"):
        make_scenario(["310", "311"], str(spec), [330, 331], preprocess=False)
    assert not [d for d in os.listdir(roots / "raw") if d.startswith("Dataset33")]

"""``nnUNetv2_cimis_make_scenario``: turn a fully labelled nnU-Net raw dataset into an incremental scenario.

One nnU-Net dataset per step, in one global label space (classes numbered 1..K in scenario order, the same
values at every step); each step's masks keep only that step's new classes; disjoint, seeded patient subsets
per step; a held-out test set with all labels; a joint dataset (all training cases, all labels) for the
upper bound. nnU-Net plans step 0 once; the plans are moved to every other step and the joint dataset and
each is preprocessed with them, so teacher and student always share one architecture.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.naming import check_dataset_id, check_dataset_name, dataset_folder_name
from nnunetv2_cimis.safe_load import load_json_object
from nnunetv2_cimis.scenarios.intensity import (WindowSpec, ct_windows, fixed_window_properties,
                                                parse_intensity_window, set_intensity_properties)
from nnunetv2_cimis.nnunet_folders import dataset_id_taken, dataset_name, require_env
from nnunetv2_cimis.scenarios.datasets import (SegmentationIO, check_images_readable, load_raw_dataset, plain_labels,
                                               raw_relative, remap, sigterm_as_interrupt, staged_folder,
                                               write_label_dataset)
from nnunetv2_cimis.scenarios.scenario import load_sequences, parse_scenario, scenario_label
from nnunetv2_cimis.scenarios.splits import split_cases, write_splits
from nnunetv2_cimis.scenarios.step_metadata import METADATA_KEY, make_metadata

TEST_SET_FILENAME = "test_set.json"


def check_features_per_stage(features_per_stage: Optional[Sequence[int]]) -> Optional[List[int]]:
    """Validate ``--features-per-stage`` before any work (the number of stages is only known after planning)."""
    if features_per_stage is None:
        return None
    values = list(features_per_stage)
    if not values or any(int(f) != f or int(f) < 1 for f in values):
        raise CIMISError(f"--features-per-stage takes positive integers (features of the encoder stages, e.g. "
                         f"8 16 32 64), got {values}.")
    return [int(f) for f in values]


def fit_features_to_stages(features_per_stage: Sequence[int], n_stages: int) -> List[int]:
    """``features_per_stage`` for a network of ``n_stages`` stages: a longer list is cut, a shorter one is
    extended by repeating its last value (keeping the network small: 8 16 32 64 on 6 stages gives
    8 16 32 64 64 64, as nnU-Net itself repeats its cap of 320 in the deepest stages)."""
    values = [int(f) for f in features_per_stage]
    return values[:n_stages] + [values[-1]] * max(0, n_stages - len(values))


def shrink_network(plans_file: str, configuration: str, features_per_stage: Sequence[int]) -> List[int]:
    """Set smaller ``features_per_stage`` in a plans file (plans are data; the trainers are untouched).

    The list is fitted to the planned number of stages (:func:`fit_features_to_stages`); returns what was written.
    """
    features_per_stage = check_features_per_stage(features_per_stage)
    with open(plans_file) as f:
        plans = json.load(f)
    if configuration not in plans["configurations"]:
        raise CIMISError(f"nnU-Net planned no {configuration!r} configuration for this dataset "
                         f"(planned: {sorted(plans['configurations'])}).")
    kwargs = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    kwargs["features_per_stage"] = fit_features_to_stages(features_per_stage, n)
    if len(features_per_stage) != n:
        print(f"--features-per-stage: the planned {configuration} network has {n} stages; using "
              f"{kwargs['features_per_stage']}", file=sys.stderr)
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)
    return kwargs["features_per_stage"]


def check_fingerprint_samples(value: Optional[int]) -> Optional[int]:
    """Validate ``--fingerprint-samples`` (None: nnU-Net's own number)."""
    if value is None:
        return None
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise CIMISError(f"--fingerprint-samples takes a positive whole number of foreground voxels, got {value!r}.")
    return int(value)


def fingerprint_extractor(samples: Optional[int] = None):
    """nnU-Net's ``DatasetFingerprintExtractor``, or, with ``samples``, the same extractor drawing ``samples``
    foreground voxels over the whole dataset for its intensity statistics instead of nnU-Net's 10e7.

    nnU-Net draws with replacement, so a dataset with fewer foreground voxels than that gains nothing from more
    draws. Measured with 1 process: the 2D laparoscopic demo (60 RGB frames of 64 x 64) took 29 s per fingerprint
    with 10e7 (13-15 s drawing about 6 million voxels per case, 11 s of percentiles over 10e7 values per channel)
    and 4 s with 1e6, most of it starting the worker; the 3D phantom (24 cases of 32^3) 14.3 s and 4.3 s, with
    the same 0.5 / 50 / 99.5 percentiles (-806 / 106 / 214 HU), mean 91.7 vs 92.0 HU, std 148.6 vs 148.1 HU.
    Only ``CTNormalization`` reads these statistics."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    if samples is None:
        return DatasetFingerprintExtractor

    class SampledFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = samples

    return SampledFingerprintExtractor


def plan_and_preprocess(step0_id: int, other_ids: Sequence[int], configuration: str, planner: str,
                        plans_name: str, features_per_stage: Optional[Sequence[int]], num_processes: int,
                        intensity_window: WindowSpec = "step0", joint_id: Optional[int] = None,
                        fingerprint_samples: Optional[int] = None) -> None:
    """Real nnU-Net planning on step 0; plans moved to the others; all preprocessed with them.

    ``intensity_window`` (see :mod:`nnunetv2_cimis.scenarios.intensity`): ``"step0"`` keeps nnU-Net's window of
    step 0's foreground, ``"all"`` takes nnU-Net's rule over the foreground of ``joint_id`` (all training cases,
    all classes), ``(low, high)`` a fixed window. The window is read by ``CTNormalization`` only, so for plans
    without a CT channel (RGB, MRI) ``"all"`` skips the joint dataset's fingerprint and changes nothing.
    ``fingerprint_samples``: see :func:`fingerprint_extractor`.
    """
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    pre = require_env("nnUNet_preprocessed")
    extractor = fingerprint_extractor(fingerprint_samples)
    extract_fingerprint_dataset(step0_id, extractor, num_processes, False, True, False, False)
    planner_class = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), planner,
                                                current_module="nnunetv2.experiment_planning")
    if planner_class is None:
        raise CIMISError(f"Unknown nnU-Net experiment planner {planner!r}.")
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for the value 0 that is
    # the right choice for CPU training: plan with the variable unset
    saved = os.environ.pop("nnUNet_n_proc_DA", None) if os.environ.get("nnUNet_n_proc_DA") == "0" else None
    try:
        plan_experiment_dataset(step0_id, planner_class, overwrite_plans_name=plans_name)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    step0 = dataset_name(step0_id)
    plans_file = os.path.join(pre, step0, plans_name + ".json")
    if features_per_stage:
        shrink_network(plans_file, configuration, features_per_stage)
    if intensity_window == "all":
        if joint_id is None:
            raise CIMISError("--intensity-window all needs the scenario's joint dataset")
        with open(plans_file) as f:
            has_ct_channel = bool(ct_windows(json.load(f)))
        if has_ct_channel:  # without one nothing reads the window: no second fingerprint
            extract_fingerprint_dataset(joint_id, extractor, num_processes, False, True, False, False)
            with open(os.path.join(pre, dataset_name(joint_id), "dataset_fingerprint.json")) as f:
                set_intensity_properties(plans_file, json.load(f)["foreground_intensity_properties_per_channel"])
    elif intensity_window != "step0":
        with open(plans_file) as f:
            channels = json.load(f)["foreground_intensity_properties_per_channel"]
        set_intensity_properties(plans_file, {c: fixed_window_properties(*intensity_window) for c in channels})
    for d in other_ids:
        os.makedirs(os.path.join(pre, dataset_name(d)), exist_ok=True)
        move_plans_between_datasets(step0_id, d, plans_name, plans_name)
        shutil.copyfile(os.path.join(pre, step0, "dataset_fingerprint.json"),
                        os.path.join(pre, dataset_name(d), "dataset_fingerprint.json"))
        shutil.copyfile(os.path.join(require_env("nnUNet_raw"), dataset_name(d), "dataset.json"),
                        os.path.join(pre, dataset_name(d), "dataset.json"))
    for d in [step0_id] + list(other_ids):
        preprocess_dataset(d, plans_name, [configuration], [num_processes], verbose=False, show_progress_bar=False)


@dataclass
class _Source:
    name: str
    json: dict
    labels: Dict[str, int]
    cases: Dict[str, dict]
    io: SegmentationIO
    prefix: str = ""


def _load_source(dataset: str) -> _Source:
    name = dataset_name(dataset)
    _, dataset_json, cases = load_raw_dataset(name)
    first = cases[sorted(cases)[0]]
    source = _Source(name, dataset_json, plain_labels(dataset_json, name), cases,
                     SegmentationIO(dataset_json, first["images"][0]))
    for c in sorted(cases):
        check_images_readable(source.io, cases[c]["images"])
    return source


def resolve_steps(scenario: str, sources: List[_Source]) -> List[Tuple[int, List[Tuple[str, str]]]]:
    """Steps as (source index, [(class name in the source, global class name)]).

    One source: any single-dataset scenario (see :func:`parse_scenario`). Several sources: a dataset sequence
    from ``presets/sequences.json``; its datasets are matched, in order of first appearance, to the sources.
    """
    sequences = load_sequences()
    if scenario.strip().endswith(".json") and os.path.isfile(scenario.strip()):
        content = load_json_object(scenario.strip(), "scenario file")
        if not isinstance(content, dict) or not isinstance(content.get("steps"), list):
            raise CIMISError(f"{scenario} must hold {{\"steps\": [...]}}: lists of class names, or for a dataset "
                             f"sequence objects {{\"dataset\", \"classes\", \"rename\"}}.")
        if all(isinstance(st, list) for st in content["steps"]):
            scenario = json.dumps(content["steps"])
        else:
            sequences = {scenario.strip(): content}
    if len(sources) == 1 and scenario.strip() not in sequences:
        src = sources[0]
        fg = [n for n, v in sorted(src.labels.items(), key=lambda kv: kv[1]) if v != 0]
        return [(0, [(c, c) for c in g]) for g in parse_scenario(scenario, fg)]
    if scenario.strip() not in sequences:
        raise CIMISError(f"Several source datasets need a dataset-sequence scenario; {scenario!r} is not one. Known "
                         f"sequences: {', '.join(sorted(sequences)) or 'none'}.")
    spec = sequences[scenario.strip()]["steps"]
    aliases = list(dict.fromkeys(step["dataset"] for step in spec))
    if len(aliases) != len(sources):
        raise CIMISError(f"Sequence {scenario!r} uses {len(aliases)} datasets ({', '.join(aliases)}) but "
                         f"{len(sources)} sources were given; give them in that order with -d.")
    steps, seen = [], set()
    for t, step in enumerate(spec):
        k = aliases.index(step["dataset"])
        src = sources[k]
        rename = step.get("rename", {})
        pairs = []
        for c in step["classes"]:
            if c not in src.labels or c == "background":
                raise CIMISError(f"Step {t} of {scenario!r} takes class {c!r} from {src.name}, which has no such "
                                 f"label (it has {', '.join(n for n in src.labels if n != 'background')}). Is "
                                 f"{src.name} the {step['dataset']} dataset?")
            g = rename.get(c, c)
            if g in seen:
                raise CIMISError(f"Class {g!r} is learned twice in {scenario!r}; each class is new at one step.")
            seen.add(g)
            pairs.append((c, g))
        steps.append((k, pairs))
    return steps


def make_scenario(source, scenario: str, step_ids: Sequence[int], joint_id: Optional[int] = None,
                  test_fraction: float = 0.2, seed: int = 0, name: Optional[str] = None,
                  configuration: str = "3d_fullres", planner: str = "ExperimentPlanner",
                  plans_name: str = "nnUNetPlans", features_per_stage: Optional[Sequence[int]] = None,
                  step0_trainer: str = "nnUNetTrainerFT", num_processes: int = 1, preprocess: bool = True,
                  intensity_window: Union[str, Sequence[float], None] = "all",
                  fingerprint_samples: Optional[int] = None) -> dict:
    """Create the step datasets, the joint dataset and the test set of a scenario (see module docstring).

    ``source`` is one dataset (id or name) or, for a dataset sequence, a list of them. Returns a summary dict
    (dataset names, classes per step, case counts). On any error every folder it created is removed again.
    """
    if name is not None:
        check_dataset_name(name, "--name")
    features_per_stage = check_features_per_stage(features_per_stage)  # before any fingerprinting or planning
    intensity_window = parse_intensity_window(intensity_window)
    fingerprint_samples = check_fingerprint_samples(fingerprint_samples)
    raw_root = require_env("nnUNet_raw")
    source_list = [source] if isinstance(source, (str, int)) else list(source)
    sources = [_load_source(str(s)) for s in source_list]
    if len({s.name for s in sources}) != len(sources):
        raise CIMISError("The same source dataset is given twice.")
    steps = resolve_steps(scenario, sources)
    if len(sources) > 1:
        channels = {len(s.json["channel_names"]) for s in sources}
        if len(channels) > 1:
            raise CIMISError(f"The source datasets have different numbers of input channels ({sorted(channels)}); "
                             f"one network cannot take them all.")
        for k, s in enumerate(sources):
            s.prefix = f"s{k}_"
    groups = [[g for _, g in pairs] for _, pairs in steps]
    if len(step_ids) != len(steps):
        raise CIMISError(f"The scenario has {len(steps)} steps but {len(step_ids)} target dataset ids were given "
                         f"(--ids); give one id per step.")
    joint_id = joint_id if joint_id is not None else max(step_ids) + 1
    all_ids = list(step_ids) + [joint_id]
    if len(set(all_ids)) != len(all_ids):
        raise CIMISError(f"The target dataset ids {all_ids} (steps and joint) must be distinct.")
    for i in all_ids:
        check_dataset_id(i, "--ids / --joint-id")
        taken = dataset_id_taken(i)
        if taken:
            raise CIMISError(f"Dataset id {i} is already used by {taken}; choose free ids.")
    base_name = name or (sources[0].name.split("_", 1)[1] if len(sources) == 1 else "Sequence")
    names = [dataset_folder_name(i, f"{base_name}Step{t}", "--ids", "--name") for t, i in enumerate(step_ids)]
    joint_name = dataset_folder_name(joint_id, f"{base_name}Joint", "--joint-id", "--name")
    global_value = {g: k + 1 for k, g in enumerate(g for grp in groups for g in grp)}
    classes_per_step = [[global_value[g] for g in grp] for grp in groups]
    label_values_all = {"background": 0, **global_value}

    # patients: per source, a held-out test set and disjoint subsets for the steps that use the source
    subsets: List[List[str]] = [[] for _ in steps]
    test_cases: Dict[int, List[str]] = {}
    for k, src in enumerate(sources):
        users = [t for t, (sk, _) in enumerate(steps) if sk == k]
        parts, test_cases[k] = split_cases(list(src.cases), len(users), test_fraction, seed)
        for t, part in zip(users, parts):
            subsets[t] = part
    # per source, the classes it annotates in the scenario (joint dataset and test set)
    source_mapping = {k: {src.labels[c]: global_value[g] for sk, pairs in steps if sk == k for c, g in pairs}
                      for k, src in enumerate(sources)}
    # per global value, where it came from (nnUNetv2_cimis_predict --labels source maps predictions back)
    source_labels = {str(global_value[g]): {"dataset": sources[k].name, "name": c, "value": sources[k].labels[c]}
                     for k, pairs in steps for c, g in pairs}

    def entries(k: int, case_ids: Sequence[str]) -> Dict[str, dict]:
        return {sources[k].prefix + c: sources[k].cases[c] for c in case_ids}

    created: List[str] = []  # only folders this run created: clean-up never touches anything else

    def claim(folder: str) -> None:
        if not os.path.lexists(folder):
            created.append(folder)

    restore_sigterm = sigterm_as_interrupt()  # `timeout` / SLURM stop a run like Ctrl-C: cleaned up alike
    try:
        step0_folder = os.path.join(raw_root, names[0])
        test_json_path = os.path.join(step0_folder, TEST_SET_FILENAME)
        for t, ((k, pairs), subset) in enumerate(zip(steps, subsets)):
            src = sources[k]
            labels = {"background": 0, **{g: global_value[g] for grp in groups[:t + 1] for g in grp}}
            teacher = None
            if t == 1:
                teacher = {"dataset": names[0], "trainer": step0_trainer, "same_trainer_as_student": False}
            elif t > 1:
                teacher = {"dataset": names[t - 1], "trainer": None, "same_trainer_as_student": True}
            meta = make_metadata(scenario_label(scenario, groups), t, classes_per_step, teacher, names, joint_name,
                                 test_json_path, names[0])
            meta["class_names_per_step"] = groups
            meta["source_dataset"] = src.name
            meta["source_labels"] = source_labels
            folder = os.path.join(raw_root, names[t])
            claim(folder)
            write_label_dataset(folder, src.json, entries(k, subset), labels,
                                {src.labels[c]: global_value[g] for c, g in pairs}, list(src.labels.values()),
                                src.io, extra={METADATA_KEY: meta})
        folder = os.path.join(raw_root, joint_name)
        claim(folder)
        _write_joint(folder, sources, steps, subsets, label_values_all, source_mapping,
                     {"scenario": scenario_label(scenario, groups), "step_datasets": names,
                      "source_datasets": [s.name for s in sources], "source_labels": source_labels})
        _write_test_set(step0_folder, sources, test_cases, label_values_all, source_mapping)
        if preprocess:
            pre = require_env("nnUNet_preprocessed")
            for n in names + [joint_name]:
                claim(os.path.join(pre, n))
            plan_and_preprocess(step_ids[0], list(step_ids[1:]) + [joint_id], configuration, planner, plans_name,
                                features_per_stage, num_processes, intensity_window, joint_id, fingerprint_samples)
            joint_cases = [sources[k].prefix + c for t, (k, _) in enumerate(steps) for c in subsets[t]]
            step_cases = [[sources[k].prefix + c for c in subsets[t]] for t, (k, _) in enumerate(steps)]
            for n, subset in zip(names + [joint_name], step_cases + [joint_cases]):
                write_splits(os.path.join(pre, n), subset)
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        restore_sigterm()
    return {"step_datasets": names, "joint_dataset": joint_name, "classes_per_step": groups,
            "global_labels": label_values_all, "cases_per_step": [len(s) for s in subsets],
            "test_cases": sum(len(v) for v in test_cases.values()), "plans": plans_name,
            "configuration": configuration, "sources": [s.name for s in sources],
            "intensity_window": intensity_window if isinstance(intensity_window, str) else list(intensity_window)}


def _write_joint(folder: str, sources: List[_Source], steps, subsets, labels: Dict[str, int],
                 source_mapping: Dict[int, Dict[int, int]], note: dict) -> None:
    """All training cases of every step with every scenario class their source annotates.

    With one source that is every class. In a dataset sequence each source annotates only its own classes, so
    the joint bound is trained with partial labels (other classes are background in those cases).
    """
    endings = {s.json["file_ending"] for s in sources}
    if len(endings) > 1:
        raise CIMISError(f"The source datasets use different file types {sorted(endings)}; the joint dataset needs "
                         f"one. Convert them to one format (e.g. .nii.gz) first.")
    with staged_folder(folder) as tmp:
        os.makedirs(os.path.join(tmp, "labelsTr"))
        dataset = {}
        for t, (k, _) in enumerate(steps):
            src = sources[k]
            for c in subsets[t]:
                seg, props = src.io.read(src.cases[c]["label"])
                rel = f"labelsTr/{src.prefix}{c}{src.json['file_ending']}"
                src.io.write(remap(seg, source_mapping[k], list(src.labels.values()), src.cases[c]["label"]),
                             os.path.join(tmp, rel), props)
                dataset[src.prefix + c] = {"images": [raw_relative(p, folder) for p in src.cases[c]["images"]],
                                           "label": rel}
        base = sources[steps[0][0]].json
        dataset_json = {k: v for k, v in base.items() if k not in ("dataset", "labels", "numTraining", "cimis")}
        dataset_json.update({"labels": labels, "numTraining": len(dataset), "dataset": dataset, "cimis_joint": note})
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)


def _write_test_set(step0_folder: str, sources: List[_Source], test_cases: Dict[int, List[str]],
                    labels: Dict[str, int], source_mapping: Dict[int, Dict[int, int]]) -> None:
    """The held-out test set: every scenario class its source annotates, global values; images referenced,
    labels written. ``annotated_labels`` per case lists the classes its label map can be scored on."""
    out = os.path.join(step0_folder, "test_set", "labelsTs")
    os.makedirs(out, exist_ok=True)
    entries = {}
    for k, src in enumerate(sources):
        for case in sorted(test_cases[k]):
            files = src.cases[case]
            seg, props = src.io.read(files["label"])
            path = os.path.join(out, src.prefix + case + src.json["file_ending"])
            src.io.write(remap(seg, source_mapping[k], list(src.labels.values()), files["label"]), path, props)
            entries[src.prefix + case] = {"images": [raw_relative(p, step0_folder) for p in files["images"]],
                                          "label": os.path.relpath(path, step0_folder),
                                          "annotated_labels": sorted(source_mapping[k].values())}
    with open(os.path.join(step0_folder, TEST_SET_FILENAME), "w") as f:
        json.dump({"file_ending": sources[0].json["file_ending"], "labels": labels,
                   "channel_names": sources[0].json["channel_names"], "cases": entries}, f, indent=2)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("-d", "--source", required=True, nargs="+",
                   help="fully labelled source dataset (id or name); several for a dataset sequence")
    p.add_argument("-s", "--scenario", required=True,
                   help="'4-4-5' (label order), 'a,b;c,d' (class names), a preset such as 'btcv:4-4-5', or a "
                        "dataset sequence such as 'flare21-kits19-msd07' (with one -d per dataset)")
    p.add_argument("--ids", type=int, nargs="+", required=True, help="target dataset id of each step")
    p.add_argument("--joint-id", type=int, default=None, help="dataset id of the joint dataset (default: "
                                                               "last step id + 1)")
    p.add_argument("--name", default=None, help="base name of the new datasets (default: the source's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of cases held out for testing")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-pl", "--planner", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    p.add_argument("-p", "--plans-name", default="nnUNetPlans", help="plans identifier written and used")
    p.add_argument("--features-per-stage", type=int, nargs="+", default=None,
                   help="smaller network: features per encoder stage written into the plans (e.g. 8 16 32 64); "
                        "a list shorter than the planned number of stages is extended by repeating its last value")
    p.add_argument("--step0-trainer", default="nnUNetTrainerFT",
                   help="trainer that trains step 0 (the teacher of step 1)")
    p.add_argument("--intensity-window", default="all",
                   help="CT window of the plans: 'all' (default: nnU-Net's percentile rule over the labelled "
                        "foreground of every step's training cases, so later steps' organs are not clipped), 'step0' "
                        "(plain nnU-Net: step 0's organs only) or a fixed 'LOW,HIGH' window, e.g. -150,250")
    p.add_argument("--fingerprint-samples", type=int, default=None,
                   help="foreground voxels nnU-Net draws over the whole dataset for its intensity statistics "
                        "(default: nnU-Net's 10e7); on small datasets 1000000 is as good and much faster")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("--no-preprocess", action="store_true", help="write the raw datasets only")
    a = p.parse_args(argv)
    # nnU-Net's planning and preprocessing talk on stdout; keep stdout for the JSON summary
    with contextlib.redirect_stdout(sys.stderr):
        summary = make_scenario(a.source if len(a.source) > 1 else a.source[0], a.scenario, a.ids, a.joint_id, a.test_fraction, a.seed, a.name,
                                a.configuration, a.planner, a.plans_name, a.features_per_stage, a.step0_trainer,
                                a.num_processes, not a.no_preprocess, a.intensity_window, a.fingerprint_samples)
    print(json.dumps(summary, indent=2))

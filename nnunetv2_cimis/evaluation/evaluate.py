"""``nnUNetv2_cimis_evaluate``: continual evaluation of class-incremental models on a scenario's test set.

For every trainer given and every step of the scenario, the model trained at that step predicts the
held-out test cases (all classes labelled) with nnU-Net's ``nnUNetPredictor``; nnU-Net's
``compute_metrics_on_folder`` scores them; :mod:`nnunetv2_cimis.evaluation.report` writes per-class Dice,
old / new / all means per step, forgetting and backward transfer (see docs/evaluation.md).

Which model is evaluated at (trainer, step):

* step 0: the step-0 model shared by all methods, trained by ``teacher.trainer`` of step 1's ``cimis``
  block (each trainer's own step-0 model if step 1 says ``same_trainer_as_student``);
* step t > 0: ``$nnUNet_results/<step t dataset>/<trainer>__<plans>__<configuration>/fold_<fold>``;
* the joint model (upper bound) ``<joint trainer>`` on the scenario's joint dataset, one model scored at
  every step on the classes known at that step.

A model is scored on the classes learned up to its step (a class it does not predict gets Dice 0 where the
reference has it). Predictions go to ``<output>/predictions/<dataset>__<trainer>/`` and nnU-Net's
summary of each model to ``<output>/predictions/<dataset>__<trainer>/summary.json``.

Test-time mirroring is on, as in ``nnUNetv2_predict`` (``--disable_tta`` turns it off).

``--predictions DIR`` scores an existing folder instead (an ensemble, a post-processed set, the output of
``nnUNetv2_cimis_predict``): nothing is predicted; every test case's ``CASE<ending>`` in DIR is scored on the
classes learned up to the step of ``-d`` with Dice and IoU (nnU-Net's ``compute_tp_fp_fn_tn``), NSD at a
per-class tolerance in mm and HD95 (MONAI, :mod:`nnunetv2_cimis.evaluation.surface`).

Example::

    nnUNetv2_cimis_evaluate -d 901 -c 3d_fullres -p nnUNetPlans -f 0 -tr nnUNetTrainerFT nnUNetTrainerMiB \\
        -o eval_out
    nnUNetv2_cimis_evaluate -d 902 --predictions ensemble_out --labels source --nsd-tolerance 2 liver=5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.evaluation.report import FT_NEW_BOUND, JOINT_BOUND, write_report

DEFAULT_JOINT_TRAINER = "nnUNetTrainerJoint"
METRICS = ("Dice", "IoU")


def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CIMISError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CIMISError(f"{what} {path} is not valid JSON ({e})") from None


def _step_info(raw_root: str, name: str):
    from nnunetv2_cimis.scenarios.step_metadata import read_step_info
    return read_step_info(_load_json(os.path.join(raw_root, name, "dataset.json"), f"dataset.json of {name}"), name)


def load_test_set(path: str, step0_folder: Optional[str] = None) -> dict:
    """Read and check ``test_set.json`` (``file_ending``, ``labels``, ``cases``); label paths made absolute.

    Falls back to ``<step0_folder>/test_set.json`` when ``path`` does not exist (raw folder moved).
    """
    if not os.path.isfile(path) and step0_folder is not None:
        alt = os.path.join(step0_folder, "test_set.json")
        if os.path.isfile(alt):
            path = alt
    ts = _load_json(path, "the scenario's test set")
    for key in ("file_ending", "labels", "cases"):
        if key not in ts:
            raise CIMISError(f"{path} lacks the key '{key}'; recreate the scenario with nnUNetv2_cimis_make_scenario")
    if not ts["cases"]:
        raise CIMISError(f"{path} lists no test cases; make the scenario with a test fraction > 0")
    from nnunetv2_cimis.naming import check_case_identifier, check_file_ending
    check_file_ending(ts["file_ending"], path)
    if not isinstance(ts["cases"], dict):
        raise CIMISError(f"{path}: 'cases' must map case identifiers to their files; recreate the scenario")
    base = os.path.dirname(os.path.abspath(path))
    for case, entry in ts["cases"].items():
        # reference and prediction files are named after the case: nothing may leave the output folder
        check_case_identifier(case, path)
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or \
                not isinstance(entry.get("images"), list) or not all(isinstance(p, str) for p in entry["images"]):
            raise CIMISError(f"{path}: test case {case} must have 'images' (a list of files) and 'label' (a file); "
                             f"recreate the scenario with nnUNetv2_cimis_make_scenario")
        entry["label"] = os.path.join(base, entry["label"]) if not os.path.isabs(entry["label"]) else entry["label"]
        entry["images"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in entry["images"]]
        for p in [entry["label"]] + entry["images"]:
            if not os.path.isfile(p):
                raise CIMISError(f"test case {case}: {p} does not exist")
    return ts


def predict_cases(model_dir: str, fold: Union[int, str], images: List[List[str]], output_truncated: List[str],
                  use_mirroring: bool = True, device=None, num_processes: int = 1,
                  checkpoint_name: str = "checkpoint_final.pth") -> None:
    """Predict ``images`` (one list of channel files per case) with nnU-Net's predictor, in-process.

    ``num_processes`` = 0 predicts sequentially without worker processes (fastest on a small CPU machine);
    otherwise ``predict_from_files`` with that many preprocessing and export workers.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_cimis.trainer_folder import ensure_trainer_path

    from nnunetv2_cimis.safe_load import check_checkpoint, torch_load_weights_only

    ensure_trainer_path()
    # nnU-Net's predictor unpickles checkpoints with weights_only=False: refuse a file that would run code
    # before nnU-Net touches it, and route the predictor's own load through the weights-only loader too
    ckpt_file = os.path.join(model_dir, f"fold_{fold}", checkpoint_name)
    check_checkpoint(ckpt_file, "checkpoint of the model to evaluate")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    try:
        with torch_load_weights_only("checkpoint of the model to evaluate"):
            predictor.initialize_from_trained_model_folder(model_dir, use_folds=(fold,),
                                                           checkpoint_name=checkpoint_name)
    except RuntimeError as e:
        raise CIMISError(f"cannot load the model in {model_dir} (fold {fold}): {e}. If its trainer is one of this "
                         f"package's, nnUNet_extTrainer must include `nnUNetv2_cimis_trainer_path`.") from None
    if num_processes <= 0:
        predictor.predict_from_files_sequential(images, output_truncated, save_probabilities=False, overwrite=True)
    else:
        predictor.predict_from_files(images, output_truncated, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)


def score_folder(reference_folder: str, prediction_folder: str, file_ending: str, labels: List[int],
                 example_file: str, num_processes: int = 1) -> dict:
    """Score a prediction folder against a reference folder; writes ``summary.json`` into the prediction folder.

    ``num_processes >= 1``: nnU-Net's ``compute_metrics_on_folder`` (a pool of that many spawned workers).
    ``num_processes = 0``: the same per-case function (nnU-Net's ``compute_metrics``) called in this process,
    same output format, without the few seconds a spawned worker takes to start.
    """
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import (compute_metrics, compute_metrics_on_folder,
                                                          save_summary_json)
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    rw = determine_reader_writer_from_file_ending(file_ending, example_file, allow_nonmatching_filename=True,
                                                  verbose=False)()
    summary_file = os.path.join(prediction_folder, "summary.json")
    if num_processes >= 1:
        return compute_metrics_on_folder(reference_folder, prediction_folder, summary_file, rw, file_ending,
                                         labels, num_processes=num_processes)
    files = sorted(f for f in os.listdir(prediction_folder) if f.endswith(file_ending))
    results = [compute_metrics(os.path.join(reference_folder, f), os.path.join(prediction_folder, f), rw, labels)
               for f in files]
    if not results:
        raise CIMISError(f"no prediction files ending in {file_ending} in {prediction_folder}")
    metric_names = list(results[0]["metrics"][labels[0]].keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN label: mean NaN, as nnU-Net
        means = {r: {m: float(np.nanmean([c["metrics"][r][m] for c in results])) for m in metric_names}
                 for r in labels}
    foreground_mean = {m: float(np.mean([means[r][m] for r in labels if r != 0])) for m in metric_names}
    for c in results:
        recursive_fix_for_json_export(c)
    result = {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean}
    save_summary_json(result, summary_file)
    return result


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _parse_fold(fold) -> Union[int, str]:
    if str(fold) == "all":
        return "all"
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise CIMISError(f"fold must be an integer or 'all', got {fold!r}") from None


def evaluate_scenario(dataset: Union[int, str], configuration: str, plans: str, fold: Union[int, str],
                      trainers: Sequence[str], output_dir: str, joint_trainer: Optional[str] = DEFAULT_JOINT_TRAINER,
                      use_mirroring: bool = True, device=None, num_processes: int = 1,
                      checkpoint_name: str = "checkpoint_final.pth", print_table: bool = False,
                      joint_bound: float = JOINT_BOUND, ft_new_bound: float = FT_NEW_BOUND) -> dict:
    """Predict the scenario's test set with every (trainer, step) model, score, and write the report.

    Args:
        dataset: id or name of any step dataset of the scenario.
        configuration, plans, fold: as for ``nnUNetv2_train`` (fold may be ``"all"``).
        trainers: incremental trainers to compare (names as given to ``nnUNetv2_train -tr``).
        output_dir: where predictions, ``scores.csv``, ``summary.json``, ``report.md`` and
            ``dice_per_class.png`` go (created).
        joint_trainer: trainer of the joint model on the scenario's joint dataset; None to leave it out.
        use_mirroring: test-time mirroring (on by default, as nnU-Net's predictor; False: one network pass
            per window instead of 8 in 3D).
        device: ``torch.device``; default CUDA when available, else CPU.
        num_processes: worker processes of prediction and scoring; 0 = everything in this process
            (``predict_from_files_sequential`` and nnU-Net's per-case ``compute_metrics``): no worker start-up,
            the fastest choice on a small CPU machine.
        checkpoint_name: checkpoint file in each model's fold folder.
        print_table: print the Markdown tables.
        joint_bound, ft_new_bound: the report's bounds check: a WARNING when the joint model's mean Dice over
            all classes is below ``joint_bound`` or fine-tuning's new-class Dice is below ``ft_new_bound`` at
            some step (docs/evaluation.md).

    Returns:
        The content of ``summary.json`` plus ``"markdown"`` (the tables) and ``"output_dir"``.

    Raises:
        CIMISError: environment not set, dataset without step metadata, bad test set, no trainer given, or
        none of the expected models exists. Missing models, when some exist, give a warning listing them.
    """
    from nnunetv2_cimis.nnunet_folders import dataset_name, require_env
    from nnunetv2_cimis.teacher.loading import model_folder_for

    trainers = list(dict.fromkeys(trainers))
    if not trainers and not joint_trainer:
        raise CIMISError("give at least one trainer to evaluate (-tr)")
    if joint_trainer and joint_trainer in trainers:
        raise CIMISError(f"{joint_trainer} is the joint trainer; do not list it among the incremental trainers "
                         f"(or pass a different --joint-trainer)")
    fold = _parse_fold(fold)
    raw_root = require_env("nnUNet_raw")
    results_root = require_env("nnUNet_results")
    name = dataset_name(dataset)
    info = _step_info(raw_root, name)
    step_datasets = list(info.step_datasets)
    if len(step_datasets) != info.num_steps:
        raise CIMISError(f"{name}: the step metadata lists {len(step_datasets)} step datasets for "
                         f"{info.num_steps} steps; recreate the scenario")
    classes_per_step = info.classes_per_step
    if not info.test_set:
        raise CIMISError(f"{name}: the step metadata names no test set; recreate the scenario with a test fraction")
    test_set = load_test_set(info.test_set, os.path.join(raw_root, step_datasets[0]))
    label_values = {n: int(v) for n, v in test_set["labels"].items()}
    label_names = {v: n for n, v in label_values.items()}
    scenario_labels = sorted(c for s in classes_per_step for c in s)
    if sorted(v for v in label_names if v != 0) != scenario_labels:
        raise CIMISError(f"the test set's labels {test_set['labels']} do not match the scenario's classes "
                         f"{classes_per_step}")

    step1_teacher = _step_info(raw_root, step_datasets[1]).teacher if info.num_steps > 1 else None

    def step0_trainer(t: str) -> str:
        return step1_teacher.trainer_for(t) if step1_teacher is not None else t

    fold_dir = f"fold_{fold}"
    # (display trainer, step) -> model key; model key -> model folder
    assignment: Dict[Tuple[str, int], Tuple[str, str]] = {}
    for t in trainers:
        assignment[(t, 0)] = (step_datasets[0], step0_trainer(t))
        for s in range(1, info.num_steps):
            assignment[(t, s)] = (step_datasets[s], t)
    if joint_trainer:
        joint_dataset = info.joint_dataset
        if not joint_dataset:
            raise CIMISError(f"{name}: the step metadata names no joint dataset; pass joint_trainer=None "
                             f"(--no-joint)")
        for s in range(info.num_steps):
            assignment[(joint_trainer, s)] = (joint_dataset, joint_trainer)
    models = {key: model_folder_for(results_root, key[0], key[1], plans, configuration)
              for key in dict.fromkeys(assignment.values())}
    available = {k: d for k, d in models.items() if os.path.isfile(os.path.join(d, fold_dir, checkpoint_name))}
    missing = [os.path.join(d, fold_dir, checkpoint_name) for k, d in models.items() if k not in available]
    if not available:
        raise CIMISError("none of the models to evaluate exists. Missing:\n  " + "\n  ".join(missing) +
                         "\nTrain them first (nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -p PLANS), or check -c, "
                         "-p, -f and -tr.")
    if missing:
        msg = "skipping models that do not exist:\n  " + "\n  ".join(missing)
        warnings.warn(msg, stacklevel=2)  # the command prints it once, as "warning: ..." (see main)

    os.makedirs(output_dir, exist_ok=True)
    file_ending = test_set["file_ending"]
    cases = sorted(test_set["cases"])
    ref_dir = os.path.join(output_dir, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    for c in cases:
        _link_or_copy(test_set["cases"][c]["label"], os.path.join(ref_dir, c + file_ending))
    images = [test_set["cases"][c]["images"] for c in cases]

    scores: Dict[Tuple[str, str], Dict[str, Dict[int, Dict[str, float]]]] = {}
    for key, model_dir in available.items():
        pred_dir = os.path.join(output_dir, "predictions", f"{key[0]}__{key[1]}")
        if os.path.isdir(pred_dir):
            shutil.rmtree(pred_dir)
        os.makedirs(pred_dir)
        print(f"predicting {len(cases)} test cases with {key[1]} on {key[0]}")
        predict_cases(model_dir, fold, images, [os.path.join(pred_dir, c) for c in cases], use_mirroring, device,
                      num_processes, checkpoint_name)
        absent = [c for c in cases if not os.path.isfile(os.path.join(pred_dir, c + file_ending))]
        if absent:
            raise CIMISError(f"the model in {model_dir} wrote no prediction {absent[0]}{file_ending} into {pred_dir}; "
                             f"its dataset.json file_ending must match the test set's ({file_ending})")
        result = score_folder(ref_dir, pred_dir, file_ending, scenario_labels,
                              test_set["cases"][cases[0]]["label"], num_processes)
        per_case = {}
        for r in result["metric_per_case"]:
            case = os.path.basename(r["reference_file"])[:-len(file_ending)]
            per_case[case] = {int(lab): {m: float(v[m]) for m in METRICS} for lab, v in r["metrics"].items()}
        scores[key] = per_case

    rows = []
    order = trainers + ([joint_trainer] if joint_trainer else [])
    for t in order:
        for s in range(info.num_steps):
            key = assignment[(t, s)]
            if key not in scores:
                continue
            known = [c for st in classes_per_step[:s + 1] for c in st]
            for case in cases:
                # a dataset-sequence test case is labelled only for its own dataset's classes (make_scenario
                # records them): other classes cannot be scored on it
                annotated = set(test_set["cases"][case].get("annotated_labels", known))
                for c in known:
                    if c not in annotated:
                        continue
                    for m in METRICS:
                        rows.append({"step": s, "trainer": t, "case": case, "class": label_names[c], "metric": m,
                                     "value": scores[key][case][c][m]})
    shown = [t for t in order if any(r["trainer"] == t for r in rows)]
    extra = {"scenario": info.scenario, "dataset": name, "configuration": configuration, "plans": plans,
             "fold": fold, "step_datasets": step_datasets, "joint_dataset": info.joint_dataset,
             "test_cases": cases, "use_mirroring": use_mirroring,
             "models": {f"{k[0]}/{k[1]}": d for k, d in available.items()}, "missing_models": missing,
             "evaluated": {t: sorted({r["step"] for r in rows if r["trainer"] == t}) for t in shown}}
    md = write_report(rows, label_names, classes_per_step, output_dir, trainers=shown,
                      joint_trainer=joint_trainer if joint_trainer in shown else None, extra_summary=extra,
                      print_table=print_table, joint_bound=joint_bound, ft_new_bound=ft_new_bound)
    with open(os.path.join(output_dir, "summary.json")) as f:
        out = json.load(f)
    out["markdown"] = md
    out["output_dir"] = output_dir
    return out


SURFACE_METRICS = ("Dice", "IoU", "NSD", "HD95")


def score_predictions(dataset: Union[int, str], predictions: str, output_dir: Optional[str] = None,
                      labels: str = "global", nsd_tolerance: Sequence[str] = (), step: Optional[int] = None,
                      print_table: bool = False) -> dict:
    """Score an existing prediction folder against the scenario's test set, without predicting.

    Args:
        dataset: id or name of a step dataset of the scenario; its step (or ``step``) says which classes are
            scored: those learned up to that step, on the cases that annotate them.
        predictions: folder with ``CASE<file_ending>`` for every test case.
        output_dir: where ``summary.json`` and ``scores.csv`` go (default: ``predictions``).
        labels: the values the predictions hold: ``"global"`` (the scenario's, as nnU-Net predicts them),
            ``"source"`` or a challenge name (as ``nnUNetv2_cimis_predict --labels`` writes them); mapped back
            to the scenario's values before scoring.
        nsd_tolerance: ``--nsd-tolerance`` items (:func:`nnunetv2_cimis.evaluation.surface.parse_tolerances`).

    Returns:
        The content of ``summary.json``: ``metric_per_case`` (case, reference_file, prediction_file, metrics:
        class value -> Dice, IoU, NSD, HD95, n_ref, n_pred), ``mean`` (class value -> metric means over the cases,
        NaN left out), ``foreground_mean``, ``nsd_tolerance_mm``, ``labels``, ``step``, ``markdown``.

    Raises:
        CIMISError: no step metadata or test set, a test case without prediction, predictions with values the
        mapping does not know.
    """
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    from nnunetv2_cimis.evaluation.surface import parse_tolerances, surface_metrics
    from nnunetv2_cimis.safe_load import load_json_object
    from nnunetv2_cimis.nnunet_folders import dataset_name, require_env
    from nnunetv2_cimis.scenarios.datasets import SegmentationIO
    from nnunetv2_cimis.submission.labels import apply_mapping, label_mapping

    raw_root = require_env("nnUNet_raw")
    name = dataset_name(dataset)
    info = _step_info(raw_root, name)
    if not info.test_set:
        raise CIMISError(f"{name}: the step metadata names no test set; recreate the scenario with a test fraction")
    if not os.path.isdir(predictions):
        raise CIMISError(f"--predictions {predictions} is not a folder")
    step = info.index if step is None else int(step)
    if not 0 <= step < info.num_steps:
        raise CIMISError(f"--step {step} is not a step of the scenario (0..{info.num_steps - 1})")
    test_set = load_test_set(info.test_set, os.path.join(raw_root, info.step_datasets[0]))
    file_ending = test_set["file_ending"]
    names = {int(v): n for n, v in test_set["labels"].items() if int(v) != 0}
    known = [c for s in info.classes_per_step[:step + 1] for c in s]
    # the values the predictions hold -> the scenario's values (from the last step's dataset.json: every class)
    last_json = load_json_object(os.path.join(raw_root, info.step_datasets[-1], "dataset.json"),
                                 f"dataset.json of {info.step_datasets[-1]}")
    to_target, notes = label_mapping(last_json, labels, info.step_datasets[-1])
    back = {t: g for g, t in to_target.items() if t != 0}
    tolerances = parse_tolerances(nsd_tolerance, {c: names[c] for c in known})
    cases = sorted(test_set["cases"])
    missing = [c for c in cases if not os.path.isfile(os.path.join(predictions, c + file_ending))]
    if missing:
        raise CIMISError(f"{len(missing)} test case(s) have no prediction in {predictions}: "
                         f"{', '.join(c + file_ending for c in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    io = SegmentationIO({"file_ending": file_ending}, test_set["cases"][cases[0]]["label"])
    per_case = []
    for case in cases:
        entry = test_set["cases"][case]
        ref, props = io.read(entry["label"])
        pred_file = os.path.join(predictions, case + file_ending)
        pred, _ = io.read(pred_file)
        unknown = sorted(set(np.unique(pred).tolist()) - set(back) - {0})
        if unknown:
            raise CIMISError(f"{pred_file} holds values {unknown} that --labels {labels} does not have; is it the "
                             f"right --labels?")
        pred = apply_mapping(pred, back)
        if pred.shape != ref.shape:
            raise CIMISError(f"{pred_file} has shape {pred.shape}, its reference {ref.shape}")
        annotated = [c for c in known if c in set(entry.get("annotated_labels", known))]
        surface = surface_metrics(ref, pred, annotated, tolerances, props["spacing"])
        metrics = {}
        for c in annotated:
            tp, fp, fn, _ = compute_tp_fp_fn_tn(ref == c, pred == c)
            denom = 2 * tp + fp + fn
            metrics[c] = {"Dice": float(2 * tp / denom) if denom else float("nan"),
                          "IoU": float(tp / (tp + fp + fn)) if denom else float("nan"),
                          **surface[c], "n_ref": int(tp + fn), "n_pred": int(tp + fp)}
        per_case.append({"case": case, "reference_file": entry["label"], "prediction_file": pred_file,
                         "metrics": metrics})
    mean = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class NaN in every case: mean NaN
        for c in known:
            rows = [r["metrics"][c] for r in per_case if c in r["metrics"]]
            mean[c] = {m: float(np.nanmean([r[m] for r in rows])) if rows else float("nan") for m in SURFACE_METRICS}
        foreground = {m: float(np.nanmean([mean[c][m] for c in known])) for m in SURFACE_METRICS}

    def fmt(x: float, digits: int = 3) -> str:
        return "n/a" if x != x else f"{x:.{digits}f}"

    lines = [f"| class | tolerance (mm) | Dice | IoU | NSD | HD95 (mm) |", "|---|---|---|---|---|---|"]
    for c in known:
        m = mean[c]
        lines.append(f"| {names[c]} | {tolerances[c]:g} | {fmt(m['Dice'])} | {fmt(m['IoU'])} | {fmt(m['NSD'])} | "
                     f"{fmt(m['HD95'], 2)} |")
    lines.append(f"| mean | | {fmt(foreground['Dice'])} | {fmt(foreground['IoU'])} | {fmt(foreground['NSD'])} | "
                 f"{fmt(foreground['HD95'], 2)} |")
    md = "\n".join(lines)
    out_dir = output_dir or predictions
    os.makedirs(out_dir, exist_ok=True)
    result = {"dataset": name, "step": step, "predictions": os.path.abspath(predictions), "labels": labels,
              "label_names": {str(c): names[c] for c in known}, "test_cases": cases,
              "nsd_tolerance_mm": {str(c): tolerances[c] for c in known}, "notes": notes,
              "metric_per_case": per_case, "mean": mean, "foreground_mean": foreground}
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    recursive_fix_for_json_export(result)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_nan_to_none(result), f, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w") as f:
        f.write("case,class,metric,value\n")
        for r in per_case:
            for c, m in r["metrics"].items():
                for k in SURFACE_METRICS:
                    f.write(f"{r['case']},{names[int(c)]},{k},{'' if m[k] != m[k] else m[k]}\n")
    if print_table:
        print(md)
    result["markdown"] = md
    return result


def _nan_to_none(obj):
    """JSON has no NaN: written as null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_cimis_evaluate",
                                description="Continual evaluation of class-incremental models: predict the "
                                            "scenario's test set with every step's model of every trainer, "
                                            "score with nnU-Net, write Dice per class, old/new/all means, "
                                            "forgetting and backward transfer.")
    add_version_argument(p)
    p.add_argument("-d", "--dataset", required=True, help="id or name of any step dataset of the scenario")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--fold", default="0", help="fold (default 0; 'all' allowed)")
    p.add_argument("-tr", "--trainers", nargs="+", default=[], help="incremental trainers to compare")
    p.add_argument("--joint-trainer", default=DEFAULT_JOINT_TRAINER,
                   help=f"trainer of the joint model (upper bound) on the joint dataset (default "
                        f"{DEFAULT_JOINT_TRAINER})")
    p.add_argument("--no-joint", action="store_true", help="do not evaluate the joint model")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (required unless --predictions; then default: the predictions folder)")
    p.add_argument("--disable_tta", "--disable-tta", action="store_true",
                   help="no test-time mirroring (one network pass per window instead of 8 in 3D; mirroring is on "
                        "by default, as in nnUNetv2_predict)")
    p.add_argument("--mirroring", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts
    p.add_argument("--predictions", default=None,
                   help="score this existing folder of predictions (CASE.nii.gz per test case) instead of "
                        "predicting: Dice, IoU, NSD and HD95 on the classes learned up to the step of -d")
    p.add_argument("--labels", default="global",
                   help="with --predictions: the label values the predictions hold: global (default, as nnU-Net "
                        "predicts), source or a challenge name (as nnUNetv2_cimis_predict --labels writes them)")
    p.add_argument("--nsd-tolerance", nargs="+", default=[],
                   help="with --predictions: NSD tolerance in mm, one number for every class and/or CLASS=MM per "
                        "class (default 2 mm)")
    p.add_argument("--step", type=int, default=None,
                   help="with --predictions: score the classes learned up to this step (default: the step of -d)")
    p.add_argument("-device", "--device", default=None, choices=["cuda", "cpu", "mps"],
                   help="device (default cuda when available, else cpu)")
    p.add_argument("-np", "--num-processes", type=int, default=1,
                   help="worker processes for prediction and scoring (default 1; 0 = all in this process, "
                        "fastest on a small CPU machine)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--joint-bound", type=float, default=JOINT_BOUND,
                   help=f"warn that the bounds are under-trained when the joint model's mean Dice over all classes "
                        f"is below this (default {JOINT_BOUND})")
    p.add_argument("--ft-bound", type=float, default=FT_NEW_BOUND,
                   help=f"warn that the bounds are under-trained when fine-tuning's new-class Dice is below this "
                        f"at some step (default {FT_NEW_BOUND})")
    return p


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


@cli_entry
def main(argv: Optional[List[str]] = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    if a.output is None and a.predictions is None:
        p.error("the following arguments are required: -o/--output")
    # a command shows each warning once, as one plain line (not also Python's "file:line: UserWarning" form)
    previous = warnings.showwarning
    warnings.showwarning = _print_warning
    try:
        _run(a)
    finally:
        warnings.showwarning = previous


def _run(a: argparse.Namespace) -> None:
    if a.predictions is not None:
        result = score_predictions(a.dataset, a.predictions, a.output, a.labels, a.nsd_tolerance, a.step,
                                   print_table=True)
        out = a.output or a.predictions
        print(f"scored {len(result['test_cases'])} case(s); wrote {os.path.join(out, 'summary.json')} and scores.csv")
        return
    device = None
    if a.device is not None:
        import torch
        device = torch.device(a.device)
    evaluate_scenario(a.dataset, a.configuration, a.plans, a.fold, a.trainers, a.output,
                      joint_trainer=None if a.no_joint else a.joint_trainer, use_mirroring=not a.disable_tta,
                      device=device, num_processes=a.num_processes, checkpoint_name=a.checkpoint, print_table=True,
                      joint_bound=a.joint_bound, ft_new_bound=a.ft_bound)
    print(f"wrote {os.path.join(a.output, 'report.md')}, scores.csv, summary.json and dice_per_class.png")


if __name__ == "__main__":
    main()

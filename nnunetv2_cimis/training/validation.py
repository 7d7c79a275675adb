"""Final validation of an incremental step, scored only where each class is annotated.

nnU-Net's final validation (``perform_actual_validation``) scores every label of dataset.json against the
step's masks. At a step t > 0 those masks label only the step's new classes; old classes are background
there, so an old organ the model still segments counts as false positives, and one it forgot gives NaN
(absent in reference and prediction), which turns ``foreground_mean`` into NaN ("Mean Validation Dice: nan").

The rule here: every validation case gets a *step reference*

* new classes: the step's own mask (nnU-Net's ``gt_segmentations``), unchanged;
* old classes: the teacher's prediction (the model of step t-1, which the student extends), wherever the
  step's mask is background. The teacher is run with nnU-Net's predictor exactly as nnU-Net runs the student
  (sliding window, Gaussian weighting, test-time mirroring) and resampled to the case's geometry by
  nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``.

Old-class Dice thus measures how much of what the teacher segmented the student still segments (retention);
new-class Dice is measured against real annotations. The references are written to
``fold_x/gt_segmentations/`` (one file per validation case, nnU-Net's name for a folder of references) and
nnU-Net's own ``perform_actual_validation`` and ``compute_metrics_on_folder`` score against them, so
``fold_x/validation/summary.json`` keeps nnU-Net's format (``mean``, ``foreground_mean``, per case) and gains a
``cimis_step_reference`` entry that says what the reference was, with the mean Dice of old and of new classes.
nnU-Net's ``nnUNetv2_determine_postprocessing -ref fold_x/gt_segmentations`` then works on it; for
``nnUNetv2_find_best_configuration`` see :func:`write_reference_roots`. Step 0 (no teacher) is scored by
nnU-Net unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError

#: the folder inside ``fold_x`` that holds the step references of the validation cases
REFERENCE_FOLDER = "gt_segmentations"
#: the key added to nnU-Net's summary.json
SUMMARY_KEY = "cimis_step_reference"


def compose_step_reference(step_mask: np.ndarray, teacher_segmentation: np.ndarray,
                           old_labels: Iterable[int]) -> np.ndarray:
    """The reference of one validation case: the step's mask, with the teacher's old classes where it is 0.

    Args:
        step_mask: integer label map of the step dataset (new classes, 0 elsewhere; an ignore label stays).
        teacher_segmentation: the teacher's label map of the same case, same shape (values 0 and old labels).
        old_labels: the label values learned before this step.

    Returns:
        A new array of ``step_mask``'s shape and dtype.

    Raises:
        CIMISError: the shapes differ.
    """
    if step_mask.shape != teacher_segmentation.shape:
        raise CIMISError(f"The teacher's segmentation has shape {teacher_segmentation.shape}, the step's mask "
                         f"{step_mask.shape}: they must describe the same case in the same geometry.")
    reference = np.array(step_mask, copy=True)
    take = (step_mask == 0) & np.isin(teacher_segmentation, list(old_labels))
    reference[take] = teacher_segmentation[take].astype(reference.dtype)
    return reference


def _mean_dice(means: dict, labels: Sequence[int]) -> float:
    values = [means[k]["Dice"] for k in means if int(k) in set(labels)]
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def mark_summary(summary_file: str, old_labels: Sequence[int], new_labels: Sequence[int], teacher: str,
                 reference_folder: str) -> dict:
    """Add :data:`SUMMARY_KEY` to an nnU-Net summary.json scored against step references; returns the entry."""
    with open(summary_file) as f:
        summary = json.load(f)
    entry = {
        "rule": "new classes scored against the step's masks; old classes against the teacher's predictions "
                "where the step's mask is background (nnunetv2_cimis.training.validation)",
        "reference_folder": os.path.abspath(reference_folder),
        "teacher": teacher,
        "old_labels": [int(v) for v in old_labels],
        "new_labels": [int(v) for v in new_labels],
        "mean_dice_old": _mean_dice(summary["mean"], old_labels),
        "mean_dice_new": _mean_dice(summary["mean"], new_labels),
    }
    summary[SUMMARY_KEY] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in entry.items()}
    with open(summary_file, "w") as f:
        json.dump(summary, f, sort_keys=True, indent=4)
    return summary[SUMMARY_KEY]


def score_step_predictions(prediction_folder: str, reference_folder: str, output_file: str, image_reader_writer,
                           file_ending: str, labels: Sequence[int], old_labels: Sequence[int],
                           new_labels: Sequence[int], teacher: str, ignore_label: Optional[int] = None,
                           num_processes: int = 1) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` against step references, then :func:`mark_summary`.

    Returns nnU-Net's result dict with :data:`SUMMARY_KEY` added.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    metrics = compute_metrics_on_folder(reference_folder, prediction_folder, output_file, image_reader_writer,
                                        file_ending, list(labels), ignore_label, num_processes=num_processes)
    metrics[SUMMARY_KEY] = mark_summary(output_file, old_labels, new_labels, teacher, reference_folder)
    return metrics


def predict_teacher_segmentation(trainer, data: torch.Tensor, properties: dict) -> np.ndarray:
    """The teacher's label map of one preprocessed case, in the case's original geometry.

    nnU-Net's predictor runs the teacher with the settings of nnU-Net's final validation; the teacher's own
    plans and dataset.json define its outputs.
    """
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    info = trainer.teacher_info
    plans_manager = PlansManager(info.plans)
    configuration = info.init_args.get("configuration", trainer.configuration_name)
    configuration_manager = plans_manager.get_configuration(configuration)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.teacher, plans_manager, configuration_manager, None, info.dataset_json,
                                    info.trainer_name, trainer.inference_allowed_mirroring_axes)
    decoder = getattr(trainer.teacher, "decoder", None)
    deep_supervision = getattr(decoder, "deep_supervision", None)
    if deep_supervision is not None:
        decoder.deep_supervision = False  # the predictor expects one output, as in nnU-Net's validation
    try:
        logits = predictor.predict_sliding_window_return_logits(data).cpu()
    finally:
        if deep_supervision is not None:
            decoder.deep_supervision = deep_supervision
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, plans_manager.get_label_manager(info.dataset_json),
        properties, return_probabilities=False)


def write_step_references(trainer, keys: Sequence[str]) -> str:
    """Write the step reference of every case in ``keys`` to ``<fold folder>/gt_segmentations``; returns it.

    The folder is rebuilt each time (it belongs to this fold's validation and holds nothing else).
    """
    folder = os.path.join(trainer.output_folder, REFERENCE_FOLDER)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    masks = os.path.join(trainer.preprocessed_dataset_folder_base, "gt_segmentations")
    file_ending = trainer.dataset_json["file_ending"]
    rw = trainer.plans_manager.image_reader_writer_class()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    for k in dataset.identifiers:
        data, _, _, properties = dataset.load_case(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The given NumPy array is not writable", as in nnU-Net
            data = torch.from_numpy(data[:])
        teacher_seg = predict_teacher_segmentation(trainer, data, properties)
        mask, _ = rw.read_seg(os.path.join(masks, k + file_ending))
        mask = mask[0]
        if teacher_seg.size == mask.size and teacher_seg.shape != mask.shape:
            teacher_seg = teacher_seg.reshape(mask.shape)  # 2D readers add a singleton axis to the mask
        reference = compose_step_reference(mask, teacher_seg, trainer.step.old_labels)
        rw.write_seg(reference.astype(np.uint8 if reference.max() < 256 else np.uint16),
                     os.path.join(folder, k + file_ending), properties)
    return folder


def perform_step_validation(trainer, nnunet_validation, save_probabilities: bool = False) -> None:
    """The final validation of a step t > 0: step references, then nnU-Net's validation scored against them.

    ``nnunet_validation`` is nnU-Net's ``perform_actual_validation`` (bound to the trainer). nnU-Net reads the
    references from ``<preprocessed_dataset_folder_base>/gt_segmentations``; for the duration of the call that
    attribute points at the fold folder, whose ``gt_segmentations`` holds the step references, and the split
    (which nnU-Net reads from the same attribute's ``splits_final.json``) is the one computed before. Everything
    else nnU-Net does (prediction, export, summary.json, the log line) is unchanged.
    """
    if trainer.teacher is None:
        raise CIMISError("The final validation of an incremental step needs the teacher, which is not loaded; "
                         "run it through nnUNetv2_train (with --val to validate only).")
    split = trainer.do_split()
    val_keys = split[1]
    reference_base = trainer.output_folder
    if trainer.local_rank == 0:
        trainer.print_to_log_file(f"Step references for {len(val_keys)} validation cases: new classes "
                                  f"{trainer.step.new_labels} from the step's masks, old classes "
                                  f"{trainer.step.old_labels} from the teacher's predictions")
        write_step_references(trainer, val_keys)
    preprocessed_base = trainer.preprocessed_dataset_folder_base
    trainer.preprocessed_dataset_folder_base = reference_base
    trainer.do_split = lambda: split  # nnU-Net reads splits_final.json from that folder too: keep the split
    try:
        nnunet_validation(save_probabilities)
    finally:
        trainer.preprocessed_dataset_folder_base = preprocessed_base
        del trainer.do_split
    if trainer.local_rank == 0:
        summary = os.path.join(trainer.output_folder, "validation", "summary.json")
        entry = mark_summary(summary, trainer.step.old_labels, trainer.step.new_labels,
                             trainer.teacher_info.checkpoint_path, os.path.join(reference_base, REFERENCE_FOLDER))
        trainer.print_to_log_file(f"Mean validation Dice of the old classes (against the teacher): "
                                  f"{entry['mean_dice_old']}; of the new classes (against the step's masks): "
                                  f"{entry['mean_dice_new']}", also_print_to_console=True)


def write_reference_roots(dataset: str, model_folders: Sequence[str], folds: Sequence[int],
                          output: str) -> Dict[str, str]:
    """Lay the step references of trained models out as nnU-Net's own folders, for
    ``nnUNetv2_find_best_configuration``.

    That command scores the cross-validation predictions against ``$nnUNet_raw/<dataset>/labelsTr`` and
    ``$nnUNet_preprocessed/<dataset>/gt_segmentations`` (and reads the plans from the latter folder). This
    writes ``<output>/nnUNet_raw/<dataset>/labelsTr`` and ``<output>/nnUNet_preprocessed/<dataset>/`` with the
    references of ``fold_<f>/gt_segmentations`` of every model and the plans files, so the command runs with
    ``nnUNet_raw`` and ``nnUNet_preprocessed`` pointing there (``nnUNet_results`` unchanged).

    Models are ranked on one reference only: a case whose reference differs between two models (they were
    validated against different teachers, e.g. 2d and 3d_fullres chains from step 2 on) is refused.

    Returns:
        ``{"nnUNet_raw": ..., "nnUNet_preprocessed": ...}``.

    Raises:
        CIMISError: a fold was not validated by this package at a step > 0, references disagree, or ``output``
            already holds the dataset.
    """
    from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config

    from nnunetv2_cimis.naming import check_dataset_folder
    from nnunetv2_cimis.nnunet_folders import require_env
    check_dataset_folder(dataset, "the dataset")
    roots = {k: os.path.join(os.path.abspath(output), k) for k in ("nnUNet_raw", "nnUNet_preprocessed")}
    labels = os.path.join(roots["nnUNet_raw"], dataset, "labelsTr")
    pre = os.path.join(roots["nnUNet_preprocessed"], dataset)
    if os.path.lexists(labels) or os.path.lexists(pre):
        raise CIMISError(f"{output} already holds reference folders for {dataset}; choose an empty output folder.")
    sources: Dict[str, str] = {}
    for model in model_folders:
        for f in folds:
            folder = os.path.join(model, f"fold_{f}", REFERENCE_FOLDER)
            if not os.path.isdir(folder):
                raise CIMISError(f"{folder} does not exist: fold {f} of {model} was not validated against step "
                                 f"references (step 0, or trained before this package version). Run "
                                 f"`nnUNetv2_train ... --val` for it, or use nnU-Net's folders for step 0.")
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name in sources and not _same_reference(sources[name], path, model):
                    raise CIMISError(f"The references of {name} differ between {sources[name]} and {path}: the models "
                                     f"were validated against different teachers, so one reference cannot rank them. "
                                     f"Compare them on the scenario's test set (nnUNetv2_cimis_evaluate) instead.")
                sources.setdefault(name, path)
    os.makedirs(labels)
    os.makedirs(os.path.join(pre, "gt_segmentations"))
    for name, path in sources.items():
        shutil.copy(path, os.path.join(labels, name))
        shutil.copy(path, os.path.join(pre, "gt_segmentations", name))
    preprocessed = os.path.join(require_env("nnUNet_preprocessed"), dataset)
    for model in model_folders:
        plans_name = convert_identifier_to_trainer_plans_config(os.path.basename(os.path.normpath(model)))[1]
        shutil.copy(os.path.join(preprocessed, plans_name + ".json"), os.path.join(pre, plans_name + ".json"))
    shutil.copy(os.path.join(preprocessed, "dataset.json"), os.path.join(pre, "dataset.json"))
    return roots


def _same_reference(a: str, b: str, model_folder: str) -> bool:
    """Same label map (files written at different times may differ in their compressed bytes)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if fa.read() == fb.read():
            return True
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    rw = PlansManager(os.path.join(model_folder, "plans.json")).image_reader_writer_class()
    return bool(np.array_equal(rw.read_seg(a)[0], rw.read_seg(b)[0]))


def build_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cimis_step_references",
        description="Write the step references of trained models of a step dataset as nnUNet_raw / "
                    "nnUNet_preprocessed folders, for nnUNetv2_find_best_configuration (see docs/usage.md).")
    from nnunetv2_cimis.command_options import add_version_argument
    add_version_argument(p)
    p.add_argument("dataset", help="dataset name or id (a step dataset)")
    p.add_argument("-tr", nargs="+", required=True, help="trainers (results folder names) to compare")
    p.add_argument("-p", nargs="+", default=["nnUNetPlans"], help="plans identifiers (default nnUNetPlans)")
    p.add_argument("-c", nargs="+", required=True, help="configurations")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("-o", required=True, help="output folder (new) for the two reference roots")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    from nnunetv2_cimis.errors import cli_entry

    @cli_entry
    def run():
        from nnunetv2_cimis.naming import check_trainer_name
        from nnunetv2_cimis.nnunet_folders import dataset_name, require_env
        a = build_parser().parse_args(argv)
        name = dataset_name(a.dataset)
        models = []
        for t in a.tr:
            check_trainer_name(t, "-tr")
            for plans in a.p:
                for c in a.c:
                    models.append(os.path.join(require_env("nnUNet_results"), name, f"{t}__{plans}__{c}"))
        roots = write_reference_roots(name, models, a.f, a.o)
        print("Run nnU-Net's command on these references:\n"
              f"  nnUNet_raw={roots['nnUNet_raw']} nnUNet_preprocessed={roots['nnUNet_preprocessed']} "
              f"nnUNetv2_find_best_configuration {name} -tr {' '.join(a.tr)} -p {' '.join(a.p)} "
              f"-c {' '.join(a.c)} -f {' '.join(map(str, a.f))}")

    run()


if __name__ == "__main__":
    main()

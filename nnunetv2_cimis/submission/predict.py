"""``nnUNetv2_cimis_predict``: predict with nnU-Net's predictor, then restore the source's (or a challenge's)
label values and the challenge's file names.

Prediction is nnU-Net's own (``nnUNetPredictor.initialize_from_trained_model_folder`` and
``predict_from_files``): folds given with ``-f`` are ensembled, test-time mirroring is on unless
``--disable_tta``, ``-chk``, ``-step_size``, ``-device``, ``-npp`` and ``-nps`` mean what they mean for
``nnUNetv2_predict``. The checkpoints are loaded weights-only (:mod:`nnunetv2_cimis.safe_load`).

The predictor writes into a hidden staging folder inside the output folder; each segmentation is then relabelled
(:func:`nnunetv2_cimis.submission.labels.label_mapping`) and written under its final name, and the staging
folder is removed, so the output folder holds the predictions only (challenges count files one-to-one).

Examples::

    nnUNetv2_cimis_predict -i imagesTs -o out -d 902 -c 3d_fullres -tr nnUNetTrainerMiB -f 0 --labels source
    nnUNetv2_cimis_predict -i /workspace/inputs -o /workspace/outputs -m /opt/model -f all --challenge flare22
    nnUNetv2_cimis_predict -i ensembled_folder -o out -m MODEL_FOLDER --segmentations --challenge amos
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry
from nnunetv2_cimis.safe_load import load_json_object
from nnunetv2_cimis.submission.conventions import CHALLENGES, ChallengeConvention, find_inputs, get_convention
from nnunetv2_cimis.submission.labels import apply_mapping, label_mapping


def resolve_model_folder(model: Optional[str], dataset: Optional[str], trainer: str, plans: str,
                         configuration: Optional[str]) -> str:
    """``-m`` as given, or ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` (nnU-Net's rule)."""
    if model:
        folder = os.path.abspath(model)
    else:
        if not dataset or not configuration:
            raise CIMISError("give the model folder with -m, or the dataset and configuration with -d and -c")
        from nnunetv2_cimis.naming import check_trainer_name
        from nnunetv2_cimis.nnunet_folders import dataset_name, require_env
        check_trainer_name(trainer, "-tr")
        folder = os.path.join(require_env("nnUNet_results"), dataset_name(dataset),
                              f"{trainer}__{plans}__{configuration}")
    for f in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise CIMISError(f"{folder} is not a trained nnU-Net model folder ({f} is missing); train it, install it "
                             f"with nnUNetv2_install_pretrained_model_from_zip, or check -d/-tr/-p/-c")
    return folder


def _parse_folds(folds: Sequence[str]) -> tuple:
    out = []
    for f in folds:
        if str(f) == "all":
            out.append("all")
        else:
            try:
                out.append(int(f))
            except ValueError:
                raise CIMISError(f"-f takes fold numbers or 'all', got {f!r}") from None
    return tuple(out)


def run_predictor(model_folder: str, folds: tuple, inputs: List[List[str]], outputs_truncated: List[str],
                  checkpoint: str = "checkpoint_final.pth", use_mirroring: bool = True, step_size: float = 0.5,
                  device: Optional[str] = None, npp: int = 3, nps: int = 3) -> None:
    """nnU-Net's predictor on explicit file lists, every checkpoint checked and loaded weights-only."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_cimis.command_options import resolve_device
    from nnunetv2_cimis.trainer_folder import ensure_trainer_path
    from nnunetv2_cimis.safe_load import check_checkpoint, torch_load_weights_only

    ensure_trainer_path()
    for f in folds:
        ckpt = os.path.join(model_folder, f"fold_{f}", checkpoint)
        check_checkpoint(ckpt, "checkpoint of the model to predict with")
    dev = resolve_device(device)
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    with torch_load_weights_only("checkpoint of the model to predict with"):
        try:
            predictor.initialize_from_trained_model_folder(model_folder, use_folds=folds, checkpoint_name=checkpoint)
        except RuntimeError as e:
            raise CIMISError(f"cannot load the model in {model_folder}: {e}. If its trainer is one of this package's, "
                             f"nnUNet_extTrainer must include `nnUNetv2_cimis_trainer_path`.") from None
    if npp <= 0 or nps <= 0:
        predictor.predict_from_files_sequential(inputs, outputs_truncated, save_probabilities=False, overwrite=True)
    else:
        predictor.predict_from_files(inputs, outputs_truncated, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=npp, num_processes_segmentation_export=nps)


def relabel_folder(src_files: List[str], dst_files: List[str], dataset_json: dict, mapping: dict) -> None:
    """Read each segmentation with nnU-Net's reader-writer for the model's file type, relabel, write it."""
    from nnunetv2_cimis.scenarios.datasets import SegmentationIO
    io = SegmentationIO(dataset_json, src_files[0])
    identity = all(a == b for a, b in mapping.items())
    for src, dst in zip(src_files, dst_files):
        if identity:
            shutil.copyfile(src, dst)
            continue
        seg, props = io.read(src)
        io.write(apply_mapping(seg, mapping), dst, props)


def predict_submission(input_folder: str, output_folder: str, model_folder: str, folds: Sequence[str] = ("0",),
                       labels: str = "source", challenge: Optional[str] = None,
                       checkpoint: str = "checkpoint_final.pth", use_mirroring: bool = True, step_size: float = 0.5,
                       device: Optional[str] = None, npp: int = 3, nps: int = 3,
                       segmentations: bool = False) -> dict:
    """Predict ``input_folder`` (or relabel the segmentations in it) into ``output_folder``; see module docstring.

    Args:
        labels: ``"source"`` (the source dataset's values, as recorded at scenario creation), ``"global"`` (the
            scenario's values, as nnU-Net wrote them) or a challenge name; ``challenge`` sets it too.
        challenge: one of :data:`~nnunetv2_cimis.submission.conventions.CHALLENGES`: input naming, label values
            and output names of that challenge.
        segmentations: ``input_folder`` holds segmentations in the model's values (``CASE<ending>``, e.g. an
            ensemble or a post-processed folder): relabel and rename them, no prediction.

    Returns:
        ``{"cases": [...], "files": [...], "mapping": {model value: written value}, "notes": [...]}``.
    """
    from nnunetv2_cimis.naming import check_file_ending
    convention: Optional[ChallengeConvention] = get_convention(challenge) if challenge else None
    target = convention.name if convention is not None else labels
    if target not in ("source", "global") and target not in CHALLENGES:
        raise CIMISError(f"--labels must be source, global or a challenge ({', '.join(sorted(CHALLENGES))}), "
                         f"got {labels!r}")
    dataset_json = load_json_object(os.path.join(model_folder, "dataset.json"), "dataset.json of the model")
    file_ending = check_file_ending(dataset_json.get("file_ending"), "dataset.json of the model")
    mapping, notes = label_mapping(dataset_json, target, model_folder)
    if segmentations:
        names = sorted(f for f in os.listdir(input_folder) if f.endswith(file_ending) and not f.startswith("."))
        if not names:
            raise CIMISError(f"no segmentation ending in {file_ending} in {input_folder}")
        cases = [(n[:-len(file_ending)], [os.path.join(input_folder, n)]) for n in names]
    else:
        cases = find_inputs(input_folder, convention, file_ending, len(dataset_json.get("channel_names", {})) or 1)
    out_names = [(convention.output_name(c) if convention is not None else c + file_ending) for c, _ in cases]
    if len(set(out_names)) != len(out_names):
        raise CIMISError("two cases would be written to the same output file; check the input names")
    os.makedirs(output_folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".cimis_predict_", dir=output_folder)  # removed below: we made it
    try:
        if segmentations:
            produced = [files[0] for _, files in cases]
        else:
            run_predictor(model_folder, _parse_folds(folds), [files for _, files in cases],
                          [os.path.join(staging, c) for c, _ in cases], checkpoint, use_mirroring, step_size,
                          device, npp, nps)
            produced = [os.path.join(staging, c + file_ending) for c, _ in cases]
            absent = [p for p in produced if not os.path.isfile(p)]
            if absent:
                raise CIMISError(f"nnU-Net's predictor wrote no {os.path.basename(absent[0])}")
        final = [os.path.join(output_folder, n) for n in out_names]
        relabel_folder(produced, final, dataset_json, mapping)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return {"cases": [c for c, _ in cases], "files": out_names, "mapping": mapping, "notes": notes,
            "labels": target}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cimis_predict",
        description="Predict with nnU-Net's predictor (folds ensembled, test-time mirroring on by default), then "
                    "write the source dataset's label values (or a challenge's) under the challenge's file names. "
                    f"Challenges: {', '.join(sorted(CHALLENGES))} (see docs/usage.md, 'Submissions').")
    add_version_argument(p)
    p.add_argument("-i", "--input", required=True,
                   help="input folder: images in nnU-Net's naming (CASE_0000.nii.gz), in the challenge's naming with "
                        "--challenge, or segmentations with --segmentations")
    p.add_argument("-o", "--output", required=True, help="output folder (created); holds the predictions only")
    p.add_argument("-m", "--model", default=None,
                   help="trained model folder <trainer>__<plans>__<configuration> (instead of -d/-tr/-p/-c)")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name of the model (with -c, -tr, -p)")
    p.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3", "4"],
                   help="folds to ensemble (default 0 1 2 3 4, as nnUNetv2_predict; 'all' allowed)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("-step_size", "--step-size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    p.add_argument("--disable_tta", "--disable-tta", action="store_true",
                   help="no test-time mirroring (faster; nnU-Net mirrors by default)")
    p.add_argument("-device", "--device", default=None,
                   help="cuda, cuda:N, cpu or mps (default: cuda when a GPU is present, else cpu)")
    p.add_argument("-npp", type=int, default=3,
                   help="preprocessing workers (default 3); -npp 0 or -nps 0: everything in this process")
    p.add_argument("-nps", type=int, default=3, help="segmentation export workers (default 3)")
    p.add_argument("--labels", default="source",
                   help="label values written: source (the source dataset's, default), global (the scenario's, as "
                        "nnU-Net predicts them) or a challenge name")
    p.add_argument("--challenge", default=None, choices=sorted(CHALLENGES),
                   help="a challenge's input naming, label values and output names")
    p.add_argument("--segmentations", action="store_true",
                   help="-i holds segmentations in the model's label values (an ensemble, a post-processed folder): "
                        "relabel and rename only")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    model = resolve_model_folder(a.model, a.dataset, a.trainer, a.plans, a.configuration)
    result = predict_submission(a.input, a.output, model, a.folds, a.labels, a.challenge, a.checkpoint,
                                not a.disable_tta, a.step_size, a.device, a.npp, a.nps, a.segmentations)
    pairs = ", ".join(f"{k}->{v}" for k, v in sorted(result["mapping"].items()))
    print(f"wrote {len(result['files'])} segmentation(s) to {a.output} (labels: {result['labels']}; {pairs})")


if __name__ == "__main__":
    main()

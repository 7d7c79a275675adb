"""``nnUNetv2_cimis_export``: a model zip that whoever receives it can extend with new classes.

nnU-Net's ``export_pretrained_model`` (what ``nnUNetv2_export_model_to_zip`` runs) writes the zip: checkpoints,
plans, dataset.json, dataset_fingerprint.json, debug.json, progress.png, the validation summary. It leaves out the
files a later incremental step needs; this command appends them to the same zip, under the same paths relative
to ``nnUNet_results``, so nnU-Net's ``nnUNetv2_install_pretrained_model_from_zip`` puts them where the package
looks for them:

* ``fold_X/step_memory.pth``: the teacher memory of the next step (prototypes, statistics, label banks) for
  PGCD, DAPD, MOSInv, DDCL and the other methods that need it;
* ``fold_X/diffusion_model*/``: DDCL's replay model of this step, and every earlier step's replay model that the
  step memory lists (``ddcl_diffusion_models``; those folders live in other datasets' results folders and are
  packed at their paths relative to ``nnUNet_results``);
* ``fold_X/mosinv_synthetic/``: a MOSInv synthetic set made from this model (its manifest ``synthesis.json``
  and volumes), which the next MOSInv step reuses instead of inverting the model again.

DDCL's ``synthetic_cache/`` (images resampled from the replay models, remade on demand) and training logs are
left out. The step memory is read weights-only (:mod:`nnunetv2_cimis.safe_load`).

Example::

    nnUNetv2_cimis_export -d 902 -o model.zip -c 3d_fullres -tr nnUNetTrainerPGCD_DAPD -p nnUNetPlans -f 0
    nnUNetv2_install_pretrained_model_from_zip model.zip     # on the receiving side
"""
from __future__ import annotations

import argparse
import os
import zipfile
from typing import List, Optional, Sequence

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry

STEP_FILES = ("step_memory.pth",)
STEP_FOLDER_PREFIXES = ("diffusion_model", "mosinv_synthetic")
REPLAY_KEY = "ddcl_diffusion_models"


def _inside(results: str, rel: str, where: str) -> str:
    """``rel`` (read from a file) as a path inside ``results``; refused if it leaves it."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise CIMISError(f"{where}: {rel!r} is not a path relative to nnUNet_results")
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise CIMISError(f"{where}: {rel!r} leaves nnUNet_results")
    return os.path.join(results, norm)


def step_files(results: str, fold_dir: str) -> List[str]:
    """Absolute paths of every file of ``fold_dir`` (and of replay models its step memory lists) that a later
    step needs (see the module docstring)."""
    out: List[str] = []
    for f in STEP_FILES:
        if os.path.isfile(os.path.join(fold_dir, f)):
            out.append(os.path.join(fold_dir, f))
    folders = [os.path.join(fold_dir, d) for d in sorted(os.listdir(fold_dir))
               if d.startswith(STEP_FOLDER_PREFIXES) and os.path.isdir(os.path.join(fold_dir, d))]
    memory_file = os.path.join(fold_dir, "step_memory.pth")
    if os.path.isfile(memory_file):
        from nnunetv2_cimis.memory.step_memory import StepMemory
        memory = StepMemory.load(memory_file)
        for entry in (memory.extra or {}).get(REPLAY_KEY, []) or []:
            rel = entry.get("relative_to_results") if isinstance(entry, dict) else None
            if rel is None:
                raise CIMISError(f"{memory_file} lists a replay model outside nnUNet_results "
                                 f"({entry.get('folder') if isinstance(entry, dict) else entry}); it cannot be packed")
            folder = _inside(results, rel, memory_file)
            if not os.path.isdir(folder):
                raise CIMISError(f"{memory_file} lists the replay model {folder}, which does not exist")
            folders.append(folder)
    for folder in dict.fromkeys(folders):
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            out.extend(os.path.join(root, f) for f in sorted(files))
    return out


def export_model(dataset: str, output_file: str, configurations: Sequence[str] = ("3d_fullres",),
                 trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans", folds: Sequence[str] = ("0",),
                 checkpoints: Sequence[str] = ("checkpoint_final.pth",), strict: bool = True) -> List[str]:
    """nnU-Net's ``export_pretrained_model``, then the step files appended; returns the appended zip entries.

    Raises CIMISError when nnU-Net's paths do not agree with the environment (``nnunetv2.paths`` is read when
    nnU-Net is first imported), a requested model is missing, or a listed replay model cannot be found.
    """
    import nnunetv2.paths
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    from nnunetv2_cimis.naming import check_trainer_name
    from nnunetv2_cimis.nnunet_folders import dataset_name, require_env

    results = os.path.abspath(require_env("nnUNet_results"))
    if os.path.abspath(nnunetv2.paths.nnUNet_results or "") != results:
        raise CIMISError("nnU-Net was imported with another nnUNet_results than the environment's now; run the "
                         "export in a fresh process (the command does)")
    check_trainer_name(trainer, "-tr")
    name = dataset_name(dataset)
    folds = [str(f) for f in folds]
    for c in configurations:
        model = os.path.join(results, name, f"{trainer}__{plans}__{c}")
        for f in folds:
            fold_dir = os.path.join(model, f"fold_{f}")
            for chk in checkpoints:
                if strict and not os.path.isfile(os.path.join(fold_dir, chk)):
                    raise CIMISError(f"{os.path.join(fold_dir, chk)} does not exist; train the model or check "
                                     f"-d/-c/-tr/-p/-f/-chk")
            if strict and not os.path.isfile(os.path.join(fold_dir, "validation", "summary.json")):
                raise CIMISError(f"{fold_dir} has no validation/summary.json, which nnU-Net's export packs: finish "
                                 f"training (nnUNetv2_train ... --val to run the final validation)")
    out_dir = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(out_dir, exist_ok=True)
    try:
        export_pretrained_model(name, output_file, tuple(configurations), trainer, plans,
                                tuple(folds), strict, tuple(checkpoints))
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        raise CIMISError(f"nnU-Net's export failed: {e}") from None
    added: List[str] = []
    with zipfile.ZipFile(output_file, "a", zipfile.ZIP_DEFLATED) as z:
        present = set(z.namelist())
        for c in configurations:
            model = os.path.join(results, name, f"{trainer}__{plans}__{c}")
            for f in folds:
                fold_dir = os.path.join(model, f"fold_{f}")
                if not os.path.isdir(fold_dir):
                    continue  # not strict: nnU-Net skipped it too
                for path in step_files(results, fold_dir):
                    arc = os.path.relpath(path, results).replace(os.sep, "/")
                    if arc not in present:
                        z.write(path, arc)
                        present.add(arc)
                        added.append(arc)
    return added


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cimis_export",
        description="Export a trained model as a zip that nnUNetv2_install_pretrained_model_from_zip installs: "
                    "nnU-Net's nnUNetv2_export_model_to_zip plus the step memory, DDCL replay models and MOSInv "
                    "synthetic sets a later incremental step needs.")
    add_version_argument(p)
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-o", required=True, help="output zip file")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                   help="checkpoint files to export (default checkpoint_final.pth)")
    p.add_argument("--not_strict", "--not-strict", action="store_true",
                   help="allow missing folds or configurations (as nnU-Net's --not_strict)")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    added = export_model(a.d, a.o, a.c, a.tr, a.p, a.f, a.chk, strict=not a.not_strict)
    shown = ", ".join(added[:5]) + (f", ... ({len(added)} in all)" if len(added) > 5 else "")
    print(f"wrote {a.o}: nnU-Net's model files plus {len(added)} file(s) for later steps"
          + (f": {shown}" if added else ""))


if __name__ == "__main__":
    main()

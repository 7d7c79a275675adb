"""Making sure a trained model has its step memory, computing it for models trained by plain nnU-Net."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.memory.compute import DEFAULT_PROTOTYPE_TAP, compute_step_memory
from nnunetv2_cimis.memory.step_memory import STEP_MEMORY_FILENAME, StepMemory


def compute_memory_for_model(fold_folder: str, device: torch.device, prototype_tap: str = DEFAULT_PROTOTYPE_TAP,
                             bank_size: int = 32, progress: bool = False) -> str:
    """Compute and save ``step_memory.pth`` for the trained model in ``fold_folder``.

    Uses the model's own preprocessed training cases (``$nnUNet_preprocessed/<dataset>/<data identifier>``,
    the fold's training split), which must still be available.
    """
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2_cimis.teacher.loading import load_teacher

    ckpt = os.path.join(fold_folder, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        raise CIMISError(f"{fold_folder} has no checkpoint_final.pth: finish training that model first.")
    model = load_teacher(ckpt, device)
    checkpoint_args = model.init_args
    configuration, fold = checkpoint_args.get("configuration"), checkpoint_args.get("fold")
    cm = model.plans["configurations"][configuration]
    dataset_name = model.plans["dataset_name"]
    if not nnUNet_preprocessed.is_set():
        raise CIMISError("nnUNet_preprocessed is not set; the step memory is computed from the model's "
                         "preprocessed training cases.")
    base = os.path.join(nnUNet_preprocessed.get(), dataset_name)
    data_folder = os.path.join(base, cm["data_identifier"])
    if not os.path.isdir(data_folder):
        raise CIMISError(
            f"The step memory of {fold_folder} is missing and cannot be computed: the model's preprocessed "
            f"training data {data_folder} is not available. Compute it where that data is, with "
            f"`nnUNetv2_cimis_step_memory -m {os.path.dirname(fold_folder)} -f {fold}`, and copy step_memory.pth "
            f"next to checkpoint_final.pth.")
    dataset_class = infer_dataset_class(data_folder)
    identifiers = dataset_class.get_identifiers(data_folder)
    splits_file = os.path.join(base, "splits_final.json")
    if fold != "all" and os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
        if int(fold) < len(splits):
            identifiers = splits[int(fold)]["train"]
    labels = {int(v): k for k, v in model.dataset_json["labels"].items() if k != "ignore"}
    dataset = dataset_class(data_folder, identifiers)
    memory = compute_step_memory(model.network, dataset, identifiers, cm["patch_size"], labels, device,
                                 prototype_tap=prototype_tap, bank_size=bank_size, progress=progress)
    path = os.path.join(fold_folder, STEP_MEMORY_FILENAME)
    memory.save(path)
    return path


def ensure_step_memory(fold_folder: str, configuration: str, device: torch.device,
                       log: Optional[Callable] = None, prototype_tap: str = DEFAULT_PROTOTYPE_TAP) -> StepMemory:
    """Load the step memory of a trained model, computing it first (at ``prototype_tap``) if it is missing."""
    path = os.path.join(fold_folder, STEP_MEMORY_FILENAME)
    if not os.path.isfile(path):
        if log is not None:
            log(f"The teacher has no step memory yet ({path}); computing it from its training cases.")
        compute_memory_for_model(fold_folder, device, prototype_tap=prototype_tap)
    return StepMemory.load(path)

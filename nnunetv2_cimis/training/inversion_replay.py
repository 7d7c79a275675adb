"""MOSInversion's replay on the trainer side: the synthetic set a step replays, and loading it.

The inversion and the on-disk synthetic sets are :mod:`nnunetv2_cimis.synthesis`; the functions here connect them
to a trainer (its hyperparameters ``hp``, teacher, step memory, output folder and log). Used by
:class:`~nnunetv2_cimis.training.trainers.mosinv.nnUNetTrainerMOSInv`.

Where the synthetic set comes from (first match wins):

1. ``synthetic_folder`` (hyperparameter) if not empty: a set made by ``nnUNetv2_cimis_synthesize`` from the
   same teacher checkpoint (its SHA-256 is checked); used as it is.
2. the set recorded in the checkpoint (``--c``), ``<teacher fold folder>/mosinv_synthetic`` (the CLI's default
   output) or ``<student fold folder>/mosinv_synthetic``, if made from this teacher with these synthesis
   settings and holding at least ``num_synthetic`` volumes.
3. otherwise ``<student fold folder>/mosinv_synthetic``: generated (or completed, resumably) with the
   trainer's hyperparameters.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.synthesis.inversion import InversionConfig
from nnunetv2_cimis.synthesis.mask_augmentation import MaskAugmentation
from nnunetv2_cimis.synthesis.synthetic_sets import (DEFAULT_SUBFOLDER, existing_volumes, file_fingerprint,
                                                     load_synthetic_set, synthesis_settings,
                                                     synthesize_from_teacher, usable_set)


def inversion_config(hp: Dict[str, Any]) -> InversionConfig:
    """The inversion settings from MOSInversion's hyperparameters (a :class:`CIMISError` if bad)."""
    try:
        return InversionConfig(iterations=int(hp["inversion_iterations"]), lr=hp["inversion_lr"],
                               lr_schedule=hp["inversion_lr_schedule"], dice_weight=hp["dice_weight"],
                               stats_weight=hp["stats_weight"], first_layer_weight=hp["first_layer_weight"],
                               tv_l1_weight=hp["tv_l1_weight"], tv_l2_weight=hp["tv_l2_weight"])
    except ValueError as e:
        raise CIMISError(f"MOSInversion hyperparameters: {e}") from None


def find_or_make_synthetic_set(trainer) -> str:
    """The folder of the synthetic set the trainer's step replays (see the module docstring)."""
    hp, info = trainer.hp, trainer.teacher_info
    ckpt = info.checkpoint_path
    fingerprint = file_fingerprint(ckpt)
    n = int(hp["num_synthetic"])
    explicit = str(hp["synthetic_folder"]).strip()
    if explicit:
        if not usable_set(explicit, fingerprint, 1):  # a set chosen by the user: its settings are its own
            raise CIMISError(f"synthetic_folder={explicit} holds no synthetic set of the teacher {ckpt}. "
                             f"Make one with `nnUNetv2_cimis_synthesize -m {info.model_folder} "
                             f"-f {trainer.fold} -o {explicit}` or leave synthetic_folder empty.")
        return explicit
    own = os.path.join(trainer.output_folder, DEFAULT_SUBFOLDER)
    candidates = [os.path.join(os.path.dirname(ckpt), DEFAULT_SUBFOLDER), own]
    if trainer.synthetic_folder:  # from the checkpoint (--c)
        candidates.insert(0, trainer.synthetic_folder)
    aug = MaskAugmentation() if hp["mask_augmentation"] else \
        MaskAugmentation(p_flip=0, p_elastic=0, p_rotation=0, p_scale=0)
    settings = synthesis_settings(inversion_config(hp), aug, int(hp["synthesis_seed"]), int(hp["inversion_batch_size"]))
    for folder in candidates:  # reused only when made from this teacher with these settings
        if usable_set(folder, fingerprint, n, settings):
            trainer.print_to_log_file(f"MOSInversion: reusing the synthetic set {folder}")
            return folder
    trainer.print_to_log_file(f"MOSInversion: synthesising {n} volumes into {own}")
    synthesize_from_teacher(ckpt, trainer.teacher, trainer.teacher_memory, trainer.num_input_channels, own, n,
                            inversion_config(hp), batch_size=int(hp["inversion_batch_size"]),
                            seed=int(hp["synthesis_seed"]), augmentation=aug, device=trainer.device,
                            show_progress=trainer.local_rank == 0, log=trainer.print_to_log_file)
    return own


def prepare_replay_set(trainer) -> Tuple[str, np.ndarray, np.ndarray]:
    """Find or make the step's synthetic set (rank 0 first under DDP; the other ranks then reuse it) and load its
    first ``num_synthetic`` volumes: ``(folder, images (N, C_in, *patch), labels (N, *patch))``, checked against
    the training data's channels and patch size."""
    if trainer.is_ddp and trainer.local_rank != 0:
        torch.distributed.barrier()  # rank 0 synthesises; the others then find its set and reuse it
    folder = find_or_make_synthetic_set(trainer)
    if trainer.is_ddp and trainer.local_rank == 0:
        torch.distributed.barrier()
    indices = existing_volumes(folder)[: int(trainer.hp["num_synthetic"])]
    images, labels = load_synthetic_set(folder, indices)
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    if list(images.shape[2:]) != patch or images.shape[1] != trainer.num_input_channels:
        raise CIMISError(f"The synthetic volumes in {folder} have shape {images.shape[1:]}, but training "
                         f"needs ({trainer.num_input_channels}, {patch}).")
    counts = {int(v): int(c) for v, c in zip(*np.unique(labels, return_counts=True))}
    trainer.print_to_log_file(f"MOSInversion: {len(indices)} synthetic volumes from {folder}; label voxel counts "
                              f"{counts}")
    return folder, images, labels

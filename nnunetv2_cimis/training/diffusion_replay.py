"""DDCL's diffusion replay on the trainer side: the step's DDPM trained on nnU-Net's preprocessed training cases,
the replay models of earlier steps found through the teacher's step memory, and their samples for this step.

The DDPM itself, its records and the resumable sample cache are :mod:`nnunetv2_cimis.synthesis.diffusion`; the
functions here connect them to a trainer (its hyperparameters ``hp``, plans, preprocessed data, output folder and
log). Used by :class:`~nnunetv2_cimis.training.trainers.ddcl.nnUNetTrainerDDCL`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.synthesis.diffusion import (DiffusionConfig, SyntheticImageCache, crops_for_diffusion,
                                                replay_model_record, resolve_replay_folder, save_diffusion_model,
                                                train_diffusion_model)

#: key of the replay-model records in ``StepMemory.extra``
MEMORY_KEY = "ddcl_diffusion_models"
MISSING_REPLAY_CHOICES = ("error", "skip", "train_from_teacher_data")


def diffusion_config(hp: Dict[str, Any]) -> DiffusionConfig:
    """The DDPM settings from DDCL's ``diffusion_*`` hyperparameters (``ValueError`` / ``TypeError`` if bad)."""
    return DiffusionConfig(image_size=int(hp["diffusion_image_size"]),
                           block_channels=tuple(int(c) for c in hp["diffusion_channels"]),
                           train_iterations=int(hp["diffusion_train_iterations"]),
                           batch_size=int(hp["diffusion_batch_size"]),
                           learning_rate=float(hp["diffusion_learning_rate"]),
                           sampling_steps=int(hp["diffusion_sampling_steps"]),
                           prediction_type=str(hp["diffusion_prediction_type"]), seed=int(hp["diffusion_seed"]))


def check_replay_hyperparameters(hp: Dict[str, Any]) -> None:
    """``ValueError`` / ``TypeError`` for bad replay hyperparameters of DDCL (before anything is trained)."""
    if hp["missing_replay_model"] not in MISSING_REPLAY_CHOICES:
        raise ValueError(f"missing_replay_model must be one of {MISSING_REPLAY_CHOICES}, got "
                         f"{hp['missing_replay_model']!r}")
    for k in ("synthetic_per_batch", "num_synthetic"):
        if float(hp[k]) < 0:
            raise ValueError(f"hyperparameter {k} must be >= 0, got {hp[k]}")
    diffusion_config(hp)


def random_replay_images(images: torch.Tensor, k: int, size, rng: np.random.Generator) -> torch.Tensor:
    """``k`` images drawn from ``images`` ``(N, C, S, S)`` by ``rng``, resized (bilinear) to ``size`` and each
    flipped along each axis with probability 0.5: ``(k, C, *size)``."""
    x = images[torch.as_tensor(rng.integers(0, images.shape[0], k))]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    for i in range(k):
        for axis in (-1, -2):
            if rng.random() < 0.5:
                x[i] = x[i].flip(axis)
    return x


def diffusion_training_images(dataset, identifiers: List[str], patch_size, config: DiffusionConfig,
                              crops_per_case: int, seed: int) -> torch.Tensor:
    """Patch-sized random crops of every preprocessed case, resized to ``config.image_size``: ``(N, C, S, S)``."""
    rng = np.random.default_rng(seed)
    crops = []
    for key in identifiers:
        data = dataset.load_case(key)[0]
        crops.append(crops_for_diffusion(np.asarray(data[:]), patch_size, config.image_size, crops_per_case, rng))
    if not crops:
        raise CIMISError("No training cases to train the diffusion model on.")
    return torch.cat(crops)


def train_replay_model(trainer, dataset, keys: List[str], out_folder: str, step: int, dataset_name: str) -> str:
    """Train a DDPM on ``dataset``'s cases ``keys`` (the trainer's patch size and hyperparameters), save it in
    ``out_folder``."""
    hp, patch_size = trainer.hp, trainer.configuration_manager.patch_size
    config = diffusion_config(hp)
    images = diffusion_training_images(dataset, keys, patch_size, config, int(hp["diffusion_crops_per_case"]),
                                       int(hp["diffusion_seed"]))
    model = train_diffusion_model(images, config, trainer.device, log=trainer.print_to_log_file)
    save_diffusion_model(model, out_folder, extra_meta={"step": int(step), "dataset": dataset_name,
                                                        "cases": len(keys), "patch_size": list(patch_size)})
    trainer.print_to_log_file(f"DDCL: diffusion model of step {step} saved to {out_folder} "
                              f"({model.meta['train_seconds']:.1f} s, {images.shape[0]} crops, "
                              f"final loss {model.meta['final_loss']:.4f})")
    return out_folder


def replay_model_from_teacher_data(trainer) -> Dict[str, Any]:
    """Fallback: train the teacher step's diffusion model from its preprocessed data (if still on disk)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    teacher_dataset = trainer.step.teacher.dataset
    base = os.path.join(nnUNet_preprocessed.get() if nnUNet_preprocessed.is_set() else "", teacher_dataset)
    folder = os.path.join(base, trainer.configuration_manager.data_identifier)
    if not os.path.isdir(folder):
        raise CIMISError(f"missing_replay_model='train_from_teacher_data' needs the teacher's preprocessed data "
                         f"{folder}, which is not available; use 'skip' or retrain the teacher with "
                         f"nnUNetTrainerDDCL.")
    dataset_class = infer_dataset_class(folder)
    keys = dataset_class.get_identifiers(folder)
    out = os.path.join(trainer.output_folder, f"diffusion_model_step{trainer.step.index - 1}")
    trainer.print_to_log_file(f"DDCL: training the teacher step's diffusion model from {folder}")
    train_replay_model(trainer, dataset_class(folder, keys), keys, out, trainer.step.index - 1, teacher_dataset)
    return replay_model_record(out, trainer.step.index - 1)


def teacher_replay_models(trainer) -> List[Dict[str, Any]]:
    """The replay-model records of the teacher's step memory; when there are none, what the hyperparameter
    ``missing_replay_model`` says: stop ("error"), no replay ("skip"), or train one now."""
    memory = trainer.teacher_memory
    entries = list((memory.extra if memory is not None else {}).get(MEMORY_KEY, []))
    if not entries:
        choice = trainer.hp["missing_replay_model"]
        if choice == "error":
            raise CIMISError(
                f"The teacher ({trainer.teacher_info.checkpoint_path}) left no diffusion model in its step memory: "
                f"it was not trained with nnUNetTrainerDDCL. Train every step of the chain with nnUNetTrainerDDCL "
                f"(step 0 included), or set the hyperparameter missing_replay_model to 'skip' (no replay) or "
                f"'train_from_teacher_data' (train one now from the teacher's preprocessed data), e.g. "
                f"nnUNet_cimis_hparams='{{\"missing_replay_model\": \"skip\"}}'.")
        if choice == "train_from_teacher_data":
            entries = [replay_model_from_teacher_data(trainer)]
    return entries


def sample_replay_images(trainer, entries: List[Dict[str, Any]]) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """``num_synthetic`` images sampled from the replay models ``entries`` into ``<output folder>/synthetic_cache``
    (reused and completed if present): ``(images (N, C, S, S), cache folder)``, or ``(None, None)`` without replay."""
    hp = trainer.hp
    if not entries or int(hp["num_synthetic"]) == 0 or int(hp["synthetic_per_batch"]) == 0:
        trainer.print_to_log_file("DDCL: no replay (no diffusion model or num_synthetic / synthetic_per_batch = 0)")
        return None, None
    folders = [resolve_replay_folder(e) for e in entries]
    cache_folder = os.path.join(trainer.output_folder, "synthetic_cache")
    cache = SyntheticImageCache(cache_folder, folders, int(hp["num_synthetic"]), int(hp["diffusion_sampling_steps"]),
                                int(hp["diffusion_seed"]))
    stats = cache.ensure(trainer.device, log=trainer.print_to_log_file)
    images = cache.load()
    trainer.print_to_log_file(f"DDCL: {images.shape[0]} synthetic images from {len(folders)} diffusion model(s) in "
                              f"{cache_folder}; sampled now: {stats['sampled']} ({stats['seconds_per_image']:.3f} s "
                              f"per image)")
    return images, cache_folder


def add_step_replay_model(trainer, memory) -> None:
    """Train this step's DDPM on its training cases (``<fold folder>/diffusion_model``) and list it in the step
    memory after the earlier steps' models (``trainer.replay_models``)."""
    tr_keys, _ = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, tr_keys)
    out = os.path.join(trainer.output_folder, "diffusion_model")
    train_replay_model(trainer, dataset, tr_keys, out, trainer.step.index, trainer.plans_manager.dataset_name)
    entries = [e for e in trainer.replay_models if e.get("step") != trainer.step.index]
    memory.extra[MEMORY_KEY] = entries + [replay_model_record(out, trainer.step.index)]

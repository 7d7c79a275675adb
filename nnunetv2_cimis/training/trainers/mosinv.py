"""MOSInversion trainer: replay of synthetic old-class volumes made by mask-conditioned DeepInversion.

Kim, Lee, Shin, Kim, Park, "MOSInversion: Knowledge distillation-based incremental learning in organ segmentation
using DeepInversion", Comput. Biol. Med. 2025. At the start of a step t > 0 the trainer gets synthetic volumes from the
teacher (:mod:`nnunetv2_cimis.synthesis.inversion`: Adam on the image from Gaussian noise, Dice to an augmented label
patch of an earlier step + the teacher's step-memory feature statistics + TV priors; labels: the teacher's argmax).
Each batch of ``B`` real patches gets ``k = max(1, round(synthetic_ratio * B))`` synthetic ones (random flips), and

    L = L_real(z[:B], y[:B]) + synthetic_seg_weight * DiceCE(z[B:], y_teacher[B:])
        + kd_weight * sum_s w_s LwF-KD(z_s[B:], z_s^teacher[B:])

``L_real``: MiB's unbiased Dice+CE (``real_loss = "unbiased"``: real label 0 may be an old class) or nnU-Net's
Dice+CE (``"dice_ce"``); KD: :class:`~nnunetv2_cimis.losses.lwf.LwFDistillationLoss` over the teacher's channels
with nnU-Net's deep-supervision weights ``w_s``; synthetic labels resized to each scale by ``nearest-exact``.
The synthetic set is given, reused or made as :mod:`nnunetv2_cimis.training.inversion_replay` says. When the
step ends, the teacher's conditioning masks are carried into this step's memory (``inversion_label_bank``), so
later steps can synthesise the classes of every earlier step.

Hyperparameters (``default_hyperparameters``, overridden by ``nnUNet_cimis_hparams``): the table in
``docs/methods_mosinversion.md``, checked against the dict by ``tests/test_docs_hyperparameters.py``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.losses.common import resize_labels_like
from nnunetv2_cimis.losses.lwf import LwFDistillationLoss
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.synthesis.mask_augmentation import conditioning_masks
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental
from nnunetv2_cimis.training.inversion_replay import inversion_config, prepare_replay_set


#: the resize of the synthetic labels to each deep-supervision scale (the package's one label resize)
downsample_labels_like = resize_labels_like


class nnUNetTrainerMOSInv(nnUNetTrainerIncremental):
    """MOSInversion: synthetic old-class replay with teacher distillation (see module docstring)."""

    method_name = "MOSInversion"
    needs_teacher_memory = True
    default_hyperparameters: Dict[str, Any] = {
        "num_synthetic": 32, "inversion_iterations": 2000, "inversion_lr": 0.1, "inversion_lr_schedule": "poly",
        "inversion_batch_size": 2, "dice_weight": 1.0, "stats_weight": 1.0, "first_layer_weight": 10.0,
        "tv_l1_weight": 2.5e-5, "tv_l2_weight": 3e-8, "mask_augmentation": True, "synthesis_seed": 0,
        "synthetic_folder": "", "synthetic_ratio": 0.5, "kd_weight": 10.0, "synthetic_seg_weight": 1.0,
        "real_loss": "unbiased", "carried_masks_max": 64,
    }

    def build_method_losses(self) -> None:
        hp = self.hp
        self.synthetic_folder: Optional[str] = None
        self.synthetic_images: Optional[torch.Tensor] = None  # (N, C_in, *patch) float32, CPU
        self.synthetic_labels: Optional[torch.Tensor] = None  # (N, 1, *patch) uint8, CPU
        self.distillation = LwFDistillationLoss(alpha=1.0)
        self.unbiased_segmentation = None
        if not self.step.is_incremental:
            return
        if hp["real_loss"] not in ("unbiased", "dice_ce"):
            raise ValueError(f"hyperparameter real_loss must be 'unbiased' or 'dice_ce', got {hp['real_loss']!r}")
        for name in ("num_synthetic", "inversion_batch_size"):
            if int(hp[name]) < 1:
                raise ValueError(f"hyperparameter {name} must be >= 1, got {hp[name]}")
        for name in ("synthetic_ratio", "kd_weight", "synthetic_seg_weight", "carried_masks_max"):
            if hp[name] < 0:
                raise ValueError(f"hyperparameter {name} must be >= 0, got {hp[name]}")
        inversion_config(hp)
        if hp["real_loss"] == "unbiased":
            self.unbiased_segmentation = UnbiasedDiceCELoss(
                self.step.n_old_outputs, batch_dice=self.configuration_manager.batch_dice,
                ignore_index=self.label_manager.ignore_label)

    def on_incremental_train_start(self) -> None:
        memory = self.teacher_memory
        if memory is None:
            raise CIMISError("MOSInversion needs the teacher's step memory, but none was loaded.")
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if memory.patch_size and list(memory.patch_size) != patch:
            raise CIMISError(f"The teacher's step memory has patch size {memory.patch_size} but this step trains "
                             f"with {patch}: use the plans of the first step for every step.")
        if self._synthetic_per_batch(self.batch_size) == 0:
            self.print_to_log_file("MOSInversion: synthetic_ratio is 0, no synthesis and no replay")
            return
        self.synthetic_folder, images, labels = prepare_replay_set(self)
        self.synthetic_images, self.synthetic_labels = torch.from_numpy(images), torch.from_numpy(labels)[:, None]
        self.print_to_log_file(f"MOSInversion: replay of {self._synthetic_per_batch(self.batch_size)} per batch of "
                               f"{self.batch_size} real")

    def _synthetic_per_batch(self, real_batch: int) -> int:
        ratio = float(self.hp["synthetic_ratio"])
        return 0 if ratio <= 0 else max(1, int(round(ratio * real_batch)))

    def synthetic_batch(self, k: int, targets: List[torch.Tensor]):
        """``k`` random synthetic volumes (random flips) and their labels at the scales of ``targets``."""
        idx = torch.randint(len(self.synthetic_images), (k,))
        x, y = self.synthetic_images[idx].clone(), self.synthetic_labels[idx].clone()
        for b in range(k):  # x[b]: (C, *spatial)
            dims = [1 + a for a in range(x.ndim - 2) if torch.rand(()) < 0.5]
            if dims:
                x[b] = x[b].flip(dims)
                y[b] = y[b].flip(dims)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, [downsample_labels_like(y, t) for t in targets]

    def replay_batch(self, data: torch.Tensor, target: List[torch.Tensor]):
        k = self._synthetic_per_batch(data.shape[0]) if self.synthetic_images is not None else 0
        return self.synthetic_batch(k, target) if k > 0 else None

    def real_loss(self, output: List[torch.Tensor], target: List[torch.Tensor]) -> torch.Tensor:
        if self.unbiased_segmentation is None:
            return self.segmentation_loss(output, target)
        return self.over_scales(self.unbiased_segmentation, output, target)

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        loss = real = self.real_loss(ctx.real(output), ctx.real(target))
        terms = {"real": real}
        if ctx.n_replayed:
            syn_out = ctx.replayed(output)
            if self.hp["synthetic_seg_weight"] > 0:
                terms["synthetic_seg"] = self.segmentation_loss(syn_out, ctx.replayed(target))
                loss = loss + self.hp["synthetic_seg_weight"] * terms["synthetic_seg"]
            if self.hp["kd_weight"] > 0:
                if ctx.teacher_output is None or len(ctx.teacher_output) != len(output):
                    raise CIMISError("MOSInversion needs the teacher's output at every deep-supervision scale")
                terms["kd"] = self.over_scales(self.distillation, syn_out, ctx.replayed(ctx.teacher_output))
                loss = loss + self.hp["kd_weight"] * terms["kd"]
        self.record_loss_terms(**terms)
        return loss

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"synthetic_folder": self.synthetic_folder}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        folder = state.get("synthetic_folder")
        self.synthetic_folder = folder if folder and os.path.isdir(folder) else None

    def extend_step_memory(self, memory: StepMemory) -> None:
        """Carry the teacher's conditioning masks forward, so later steps can synthesise every old class."""
        if self.teacher_memory is None:
            return
        carried = conditioning_masks(self.teacher_memory)[: int(self.hp["carried_masks_max"])]
        memory.extra["inversion_label_bank"] = [np.asarray(m, dtype=np.uint8) for m in carried]

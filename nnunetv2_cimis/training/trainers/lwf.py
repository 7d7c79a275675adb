"""LwF trainer: fine-tuning plus output distillation from the teacher (Li & Hoiem 2016; MiB's protocol).

Loss of a step t > 0, over nnU-Net's deep-supervision outputs (highest resolution first, weights
``1/2^i``, coarsest 0, normalised; see :mod:`nnunetv2_cimis.losses.deep_supervision`):

    L = sum_s w_s DiceCE(z_s, y_s) + kd_weight * sum_s w_s LwF(z_s, z_s^teacher)

The teacher runs with deep supervision on, so every student scale is distilled from the teacher's output at
the same scale. DiceCE is nnU-Net's own loss (the background shift is *not* handled: that is what MiB and
PLOP add). At step 0 the trainer is plain nnU-Net training.

Hyperparameters (``default_hyperparameters``, overridden by ``nnUNet_cimis_hparams``): the table in
``docs/trainers_baselines.md`` (checked against the dict by ``tests/test_docs_hyperparameters.py``).
"""
from __future__ import annotations

from typing import List

import torch

from nnunetv2_cimis.losses.lwf import LwFDistillationLoss
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental


class nnUNetTrainerLwF(nnUNetTrainerIncremental):
    """Learning without Forgetting: nnU-Net's Dice+CE + ``kd_weight`` x LwF distillation at every DS scale."""

    default_hyperparameters = {"kd_weight": 100.0, "kd_alpha": 1.0}
    head_init = "random"  # MiB's official code initialises the new rows randomly for LwF and ILT

    def build_method_losses(self) -> None:
        """The method's loss modules, from ``self.hp`` (and, in subclasses, the step)."""
        if self.hp["kd_weight"] < 0:
            raise ValueError(f"kd_weight must be >= 0, got {self.hp['kd_weight']}")
        self.output_distillation = LwFDistillationLoss(alpha=self.hp["kd_alpha"])

    def distillation_loss(self, output: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """LwF term over the deep-supervision scales (unweighted by ``kd_weight``)."""
        return self.over_scales(self.output_distillation, output, ctx.teacher_output)

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        seg, kd = self.segmentation_loss(output, target), self.distillation_loss(output, ctx)
        self.record_loss_terms(segmentation=seg, kd=kd)
        return seg + self.hp["kd_weight"] * kd

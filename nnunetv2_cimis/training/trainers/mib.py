"""MiB trainer: unbiased Dice+CE and unbiased distillation (Cermelli et al., CVPR 2020).

Loss of a step t > 0, over nnU-Net's deep-supervision outputs (weights ``w_s``: ``1/2^i``, coarsest 0,
normalised), with the teacher's output at the same scale:

    L = sum_s w_s [UNCE(z_s, y_s) + dice_weight * UnbiasedDice(z_s, y_s)] + kd_weight * sum_s w_s UNKD(z_s, z_s^teacher)

UNCE and the unbiased Dice both read label 0 as "background or an old class" (the student's merged
bg+old probability); UNKD compares the teacher's background with the student's background + new classes.
The head initialisation of MiB (new rows = background weights, biases ``b_bg - log(|C^t| + 1)``) is done
by the base trainer. See :mod:`nnunetv2_cimis.losses.mib`.

Hyperparameters (``default_hyperparameters``, overridden by ``nnUNet_cimis_hparams``): the table in
``docs/trainers_baselines.md`` (checked against the dict by ``tests/test_docs_hyperparameters.py``).
"""
from __future__ import annotations

from typing import List

import torch

from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental


class nnUNetTrainerMiB(nnUNetTrainerIncremental):
    """MiB: unbiased Dice+CE + ``kd_weight`` x unbiased distillation at every deep-supervision scale."""

    default_hyperparameters = {"kd_weight": 10.0, "kd_alpha": 1.0, "dice_weight": 1.0,
                               "dice_include_merged_background": True}

    def build_method_losses(self) -> None:
        """The unbiased losses for this step's ``n_old`` (teacher channels), from ``self.hp`` and the plans."""
        if self.hp["kd_weight"] < 0:
            raise ValueError(f"kd_weight must be >= 0, got {self.hp['kd_weight']}")
        if not self.step.is_incremental:
            return
        n_old = self.step.n_old_outputs
        self.unbiased_segmentation = UnbiasedDiceCELoss(
            n_old, weight_ce=1.0, weight_dice=self.hp["dice_weight"],
            batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
            include_background=self.hp["dice_include_merged_background"],
            ignore_index=self.label_manager.ignore_label)
        self.unbiased_distillation = UnbiasedKnowledgeDistillation(n_old, alpha=self.hp["kd_alpha"])

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        seg = self.over_scales(self.unbiased_segmentation, output, target)
        kd = self.over_scales(self.unbiased_distillation, output, ctx.teacher_output)
        self.record_loss_terms(segmentation=seg, kd=kd)
        return seg + self.hp["kd_weight"] * kd

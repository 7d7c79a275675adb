"""ILT trainer: LwF plus an L2 distillation of the encoder bottleneck (Michieli & Zanuttigh, ICCVW 2019).

    L = LwF trainer's loss + feature_weight * MSE(F_student, F_teacher)

with ``F`` the output of ``encoder.stages.-1`` (nnU-Net's bottleneck, the counterpart of the backbone
output ``features['body']`` distilled in MiB's ILT code). Features have no deep-supervision scales: the
bottleneck is distilled once per iteration.

Hyperparameters: those of :class:`nnUNetTrainerLwF` and ``feature_weight``; the table in
``docs/trainers_baselines.md`` (checked against the dict by ``tests/test_docs_hyperparameters.py``).
"""
from __future__ import annotations

from typing import List

import torch

from nnunetv2_cimis.losses.ilt import FeatureDistillationMSE
from nnunetv2_cimis.training.incremental_trainer import StepContext
from nnunetv2_cimis.training.trainers.lwf import nnUNetTrainerLwF

BOTTLENECK_TAP = "encoder.stages.-1"


class nnUNetTrainerILT(nnUNetTrainerLwF):
    """LwF + ``feature_weight`` x MSE between student and teacher bottleneck features."""

    default_hyperparameters = {**nnUNetTrainerLwF.default_hyperparameters, "feature_weight": 100.0}
    student_feature_taps = {"bottleneck": BOTTLENECK_TAP}
    teacher_feature_taps = {"bottleneck": BOTTLENECK_TAP}

    def build_method_losses(self) -> None:
        super().build_method_losses()
        if self.hp["feature_weight"] < 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.hp['feature_weight']}")
        self.feature_distillation = FeatureDistillationMSE()

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        loss = super().compute_loss(output, target, ctx)
        mse = self.feature_distillation(ctx.student_features["bottleneck"], ctx.teacher_features["bottleneck"])
        self.record_loss_terms(feature=mse)
        return loss + self.hp["feature_weight"] * mse

"""ILT feature distillation: mean squared error between student and teacher encoder features.

Michieli & Zanuttigh, "Incremental Learning Techniques for Semantic Segmentation", ICCV Workshops 2019
(ILT). ILT adds to LwF's output distillation an L2 loss between the features of the old and the new
encoder (MiB's code: ``nn.MSELoss`` on the backbone output, weight 100). In nnU-Net's U-Net the analogue of
the backbone output is the bottleneck, ``encoder.stages.-1``; the weight lives in the trainer.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_cimis.losses.common import check_logits


class FeatureDistillationMSE(nn.Module):
    """Mean over all elements of ``(F_student - F_teacher)^2``.

    Inputs of ``forward(student_features, teacher_features)``:
        student_features: ``(B, C, X, Y[, Z])`` features of the student (e.g. the encoder bottleneck).
        teacher_features: same shape, from the frozen teacher (detached here).

    Returns:
        A scalar tensor >= 0.

    Raises:
        ValueError: if the inputs are not 4D/5D or their shapes differ (student and teacher must share the
            architecture: same plans, same tap).
    """

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        check_logits("student_features", student_features)
        check_logits("teacher_features", teacher_features)
        if student_features.shape != teacher_features.shape:
            raise ValueError(f"student features {tuple(student_features.shape)} and teacher features "
                             f"{tuple(teacher_features.shape)} must have the same shape; tap the same module "
                             f"of the same architecture in both networks")
        diff = student_features.float() - teacher_features.detach().float()
        return (diff * diff).mean()

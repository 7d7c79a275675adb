"""Learning without Forgetting (LwF) distillation on segmentation logits.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, in the form used for class-incremental
segmentation by MiB (Cermelli et al., CVPR 2020, ``KnowledgeDistillationLoss``): the teacher's softmax over
its own channels (background and old classes) is the soft target of the student's softmax *narrowed to
those channels*:

    L = -(1/|I|) sum_i (1/|Y_old|) sum_{c in Y_old} q_t(i, c) log softmax(z_s[:, Y_old])(i, c)

with ``q_t = softmax(alpha * z_t)``. MiB's code weights this loss by 100 for LwF (and ILT); that weight
lives in the trainer (``nnUNetTrainerLwF``), not here.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_cimis.losses.common import check_positive, check_student_teacher


class LwFDistillationLoss(nn.Module):
    """Soft cross-entropy between teacher and student over the teacher's channels (mean over classes and voxels).

    Args:
        alpha: factor applied to the teacher logits before the softmax (MiB's ``--alpha``, a "hardening" of
            the soft targets; 1.0 = plain softmax). Must be > 0. Default 1.0.

    Inputs of ``forward(student_logits, teacher_logits)``:
        student_logits: ``(B, C_total, X, Y[, Z])``, channels ``[bg, old..., new...]``.
        teacher_logits: ``(B, n_old, X, Y[, Z])`` with ``n_old <= C_total``; same batch and spatial sizes.
            The teacher is not differentiated (it is detached here).

    Returns:
        A scalar tensor (>= 0 up to the soft targets' own entropy).

    Raises:
        ValueError: bad ``alpha``; inputs not 4D/5D, with different batch/spatial sizes, or a teacher with
            more channels than the student.
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = check_positive("alpha", alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        check_student_teacher(student_logits, teacher_logits)
        n_old = teacher_logits.shape[1]
        if n_old > student_logits.shape[1]:
            raise ValueError(f"the teacher has {n_old} channels but the student only {student_logits.shape[1]} "
                             f"(student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}); "
                             f"pass the student's widened logits first")
        log_p = torch.log_softmax(student_logits[:, :n_old].float(), dim=1)
        q = torch.softmax(self.alpha * teacher_logits.detach().float(), dim=1)
        return -(q * log_p).mean(dim=1).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

"""Dual-Aligned Prototype Distillation (DAPD), from Zhu et al., "Prototype-guided calibration distillation
and dual-aligned prototype distillation for class-incremental medical image segmentation"
(arXiv 2511.07749).

Matching the current model's local prototypes to stored global prototypes alone (SDR's local-to-global
matching) ignores what the old model says about *these* images. DAPD aligns the student's local prototype
of every old class present in the batch with both references:

* the class's global prototype ``P_c`` (stored when the class was learned; for background, the
  dynamically updated background prototype), and
* the teacher's local prototype ``p_teacher_c``, the mean teacher feature over the same voxels.

For the set ``S`` of old channels (background included) with at least ``min_voxels`` voxels in the batch::

    L = (1 / |S|) sum_{c in S} [ global_weight * (1 - cos(p_student_c, P_c)) * valid_c
                                 + local_weight * (1 - cos(p_student_c, p_teacher_c)) ]

``valid_c`` = the class has a global prototype. The voxels of class ``c`` are those of
:func:`~nnunetv2_cimis.losses.prototypes.old_class_regions` equal to ``c`` (label 0, teacher argmax ``c``,
optionally above a confidence). Under ``torch.distributed`` the prototype sums and counts are summed over
ranks first (and ``S`` is decided on the global counts), so every rank computes the same loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_cimis.losses.common import check_logits
from nnunetv2_cimis.losses.prototypes import class_masks, local_prototypes


def _cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise ``1 - cos(a, b)`` of ``(K, C)`` tensors; zero rows give distance 1, never NaN."""
    return 1.0 - (F.normalize(a, dim=1, eps=eps) * F.normalize(b, dim=1, eps=eps)).sum(dim=1)


class DualAlignedPrototypeDistillation(nn.Module):
    """DAPD (see the module docstring).

    Args:
        global_weight: weight of the student-to-global alignment (default 1.0).
        local_weight: weight of the student-to-teacher local alignment (default 1.0).
        min_voxels: a class takes part only with at least this many voxels (summed over the batch and the
            ranks) at the feature resolution (default 1; a choice).
        reduce_across_ranks: sum prototype statistics over ``torch.distributed`` ranks (default True; a no-op
            in a single process).
        eps: numerical floor of prototype norms (default 1e-8).

    Inputs of :meth:`forward`:
        student_features: ``(B, C, X, Y[, Z])`` (gradients flow here).
        teacher_features: ``(B, C, X, Y[, Z])`` the teacher's features at the same tap (no gradient).
        regions: ``(B, X, Y[, Z])`` long map from ``old_class_regions`` at the feature resolution: value ``c``
            in ``0 .. K-1`` = voxel of old channel ``c``, -1 = ignored.
        global_prototypes: ``(K, C)`` global prototypes of the old channels, row 0 = background.
        global_valid: ``(K,)`` bool, which rows hold a prototype; ``None`` = all.

    Returns:
        A scalar; 0 (connected to the graph of ``student_features``) when no class has enough voxels.

    Raises:
        ValueError: negative weights, ``min_voxels < 1``, bad shapes (the message shows them).
    """

    def __init__(self, global_weight: float = 1.0, local_weight: float = 1.0, min_voxels: int = 1,
                 reduce_across_ranks: bool = True, eps: float = 1e-8):
        super().__init__()
        if global_weight < 0 or local_weight < 0:
            raise ValueError(f"global_weight and local_weight must be >= 0, got {global_weight}, {local_weight}")
        if int(min_voxels) < 1:
            raise ValueError(f"min_voxels must be >= 1, got {min_voxels}")
        self.global_weight = float(global_weight)
        self.local_weight = float(local_weight)
        self.min_voxels = int(min_voxels)
        self.reduce_across_ranks = bool(reduce_across_ranks)
        self.eps = float(eps)

    def region_masks(self, regions: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(B, K, ...)`` bool masks of the K old channels from a region map."""
        return class_masks(regions, list(range(num_classes)))

    def prototype_loss(self, student_prototypes: torch.Tensor, teacher_prototypes: torch.Tensor,
                       counts: torch.Tensor, global_prototypes: torch.Tensor,
                       global_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss from already computed local prototypes ``(K, C)`` and their voxel ``counts`` ``(K,)``."""
        k, c = student_prototypes.shape
        for name, t in (("teacher_prototypes", teacher_prototypes), ("global_prototypes", global_prototypes)):
            if t.shape != (k, c):
                raise ValueError(f"{name} {tuple(t.shape)} must match student_prototypes {(k, c)}")
        if counts.shape != (k,):
            raise ValueError(f"counts must be ({k},), got {tuple(counts.shape)}")
        valid = (torch.ones(k, dtype=torch.bool, device=student_prototypes.device) if global_valid is None
                 else global_valid.to(student_prototypes.device).bool())
        if valid.shape != (k,):
            raise ValueError(f"global_valid must be ({k},), got {tuple(valid.shape)}")
        present = (counts.to(student_prototypes.device) >= self.min_voxels)
        n_present = int(present.sum())
        if n_present == 0:
            return student_prototypes.sum() * 0.0
        ps = student_prototypes.float()
        to_global = _cosine_distance(ps, global_prototypes.detach().float().to(ps.device), self.eps)
        to_teacher = _cosine_distance(ps, teacher_prototypes.detach().float().to(ps.device), self.eps)
        per_class = (self.global_weight * to_global * valid.to(ps.dtype) + self.local_weight * to_teacher)
        return (per_class * present.to(ps.dtype)).sum() / n_present

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, regions: torch.Tensor,
                global_prototypes: torch.Tensor, global_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_logits("student_features", student_features)
        if teacher_features.shape != student_features.shape:
            raise ValueError(f"teacher_features {tuple(teacher_features.shape)} must have the shape of "
                             f"student_features {tuple(student_features.shape)} (same tap of the same architecture)")
        if regions.shape[0] != student_features.shape[0] or regions.shape[1:] != student_features.shape[2:]:
            raise ValueError(f"regions {tuple(regions.shape)} must be (B, X, Y[, Z]) of the features "
                             f"{tuple(student_features.shape)}; resize labels and teacher logits to the feature "
                             f"resolution first")
        if global_prototypes.ndim != 2 or global_prototypes.shape[1] != student_features.shape[1]:
            raise ValueError(f"global_prototypes must be (K, {student_features.shape[1]}), got "
                             f"{tuple(global_prototypes.shape)}: the prototypes must come from the same tap")
        masks = self.region_masks(regions, global_prototypes.shape[0])
        p_student, counts = local_prototypes(student_features, masks, self.reduce_across_ranks)
        with torch.no_grad():
            p_teacher, _ = local_prototypes(teacher_features.detach(), masks, self.reduce_across_ranks)
        return self.prototype_loss(p_student, p_teacher, counts, global_prototypes, global_valid)

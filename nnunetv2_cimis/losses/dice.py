"""The package's one soft Dice: nnU-Net's ``MemoryEfficientSoftDiceLoss`` on given probabilities.

Every Dice term of the package computes it here: MiB's unbiased Dice (:mod:`nnunetv2_cimis.losses.mib`, on the
merged background+old distribution), PLOP's pseudo-label Dice (:mod:`nnunetv2_cimis.losses.plop`), IAPL's
per-class Dice (:mod:`nnunetv2_cimis.losses.iapl`, sigmoid probabilities, background left out) and the Dice
term of MOSInversion's image optimisation (:mod:`nnunetv2_cimis.synthesis.inversion`, batch Dice over the classes
present in the conditioning mask). They differ only in the options below, never in the formula.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nnunetv2_cimis.losses.common import check_label_range, check_logits

__all__ = ["soft_dice_loss"]


def soft_dice_loss(probs: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   batch_dice: bool = False, smooth: float = 1e-5, include_background: bool = True,
                   present_classes_only: bool = False) -> torch.Tensor:
    """nnU-Net's soft Dice loss on given probabilities, ``-mean dc`` (nnU-Net's sign).

    ``dc_c = (2 sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth)`` with the sums over the spatial axes (and
    the batch if ``batch_dice``); the loss is minus the mean of ``dc`` over the classes (and the images unless
    ``batch_dice``), as nnU-Net returns it (it differs from ``1 - Dice`` by a constant only, so training and
    logged values match nnU-Net's). ``1 + soft_dice_loss(...)`` is ``1 - mean Dice``.

    Args:
        probs: ``(B, K, X, Y[, Z])`` probabilities (softmax, or sigmoid per class).
        labels: ``(B, X, Y[, Z])`` integer labels in ``[0, K)``.
        mask: optional ``(B, X, Y[, Z])`` bool/float, 1 = voxel counts.
        batch_dice: sum over the batch before the ratio (nnU-Net's ``batch_dice`` of the plans).
        smooth: added to numerator and denominator (nnU-Net: 1e-5).
        include_background: keep channel 0 (nnU-Net's ``do_bg``).
        present_classes_only: average only over the entries (class, or image and class) whose label occurs
            in ``labels``; absent classes are then pushed down only through the softmax of the present ones
            (MOSInversion's Dice against a conditioning mask).

    Returns:
        A scalar tensor (float32).

    Raises:
        ValueError: shapes that do not match, a single channel with ``include_background=False``, and (on
            CPU tensors, or with ``nnUNet_cimis_debug_checks=1``, see
            :func:`~nnunetv2_cimis.losses.common.check_label_range`) labels outside ``[0, K)``.
    """
    check_logits("probs", probs)
    if labels.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, X, Y[, Z]) matching probs {tuple(probs.shape)}")
    if not include_background and probs.shape[1] < 2:
        raise ValueError(f"include_background=False needs at least 2 channels, got probs {tuple(probs.shape)}")
    check_label_range(labels, probs.shape[1], name="labels", mask=mask)
    probs = probs.float()
    onehot = F.one_hot(labels.long(), probs.shape[1]).movedim(-1, 1).float()
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, probs.ndim))
    if mask is not None:
        m = mask.to(probs.dtype)[:, None]
        intersect = (probs * onehot * m).sum(axes)
        sum_pred = (probs * m).sum(axes)
        sum_gt = (onehot * m).sum(axes)
    else:
        intersect = (probs * onehot).sum(axes)
        sum_pred = probs.sum(axes)
        sum_gt = onehot.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8)
    if present_classes_only:
        present = (sum_gt > 0).to(dc.dtype)
        return -(dc * present).sum() / present.sum().clamp_min(1)
    return -dc.mean()

"""MiB: Modeling the Background, unbiased cross-entropy, unbiased distillation and an unbiased Dice.

Cermelli, Mancini, Rota Bulò, Ricci, Caputo, "Modeling the Background for Incremental Learning in Semantic
Segmentation", CVPR 2020.

At step t the masks label only the new classes; a voxel labelled 0 may be background *or any old class*
(the background shift). MiB changes both losses accordingly:

* UNCE (:class:`UnbiasedCrossEntropy`): for a voxel labelled 0 the student's probability is the sum over
  the old channels (background included), ``log p(0) = logsumexp(z[:n_old]) - logsumexp(z)``; new classes
  as usual.
* UNKD (:class:`UnbiasedKnowledgeDistillation`): the teacher's background may now be a new class, so the
  teacher's background probability is compared with the student's background *plus new classes*; old
  classes one to one; the sum over the teacher's channels is divided by their number (MiB's code).
* nnU-Net trains with Dice + CE. A plain Dice on the widened head would push every old channel to zero
  (their targets are empty in the new data). :class:`UnbiasedDiceCELoss` therefore computes the Dice on the
  same merged distribution as UNCE: channel 0 = background + old classes, compared with label 0; then one
  channel per new class.

MiB's code weights UNKD by 10 and UNCE by 1; the weights live in the trainer (``nnUNetTrainerMiB``).
The head initialisation (new rows = background weights, biases ``b_bg - log(|C^t| + 1)``) is done by the
base trainer for every method.

Conventions: logits ``(B, C_total, X, Y[, Z])`` with channels ``[bg, old..., new...]``; ``n_old`` = number of
teacher channels (background included); targets ``(B, 1, X, Y[, Z])`` (nnU-Net, float or int) or
``(B, X, Y[, Z])`` with global label values; labels ``< n_old`` count as "background or old" (step datasets
only contain 0 and new labels).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cimis.losses.common import (check_label_range, check_logits, check_positive, check_student_teacher,
                                          labels_to_index, merge_new_into_background, merge_old_into_background)
from nnunetv2_cimis.losses.dice import soft_dice_loss

__all__ = ["UnbiasedCrossEntropy", "UnbiasedKnowledgeDistillation", "UnbiasedDiceCELoss"]


def _check_n_old(n_old) -> int:
    if isinstance(n_old, bool) or not isinstance(n_old, int) or n_old < 1:
        raise ValueError(f"n_old (number of teacher channels, background included) must be an integer >= 1, "
                         f"got {n_old!r}")
    return n_old


def _check_ignore(ignore_index) -> Optional[int]:
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    return ignore_index


def _merged_labels(logits: torch.Tensor, target: torch.Tensor, n_old: int,
                   ignore_index: Optional[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Labels in the merged channel order (0 = bg+old, k = new class n_old + k - 1) and the valid mask."""
    n_total = logits.shape[1]
    if n_old > n_total:
        raise ValueError(f"n_old={n_old} but the logits have only {n_total} channels (shape "
                         f"{tuple(logits.shape)}); n_old counts the teacher's channels, background included")
    labels = labels_to_index(target, logits)
    valid = None if ignore_index is None else labels != ignore_index
    check_label_range(labels, n_total, ignore_index, name=f"target (for logits with {n_total} channels)")
    merged = torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1)
    if valid is not None:
        merged = torch.where(valid, merged, torch.zeros_like(merged))
    return merged, valid


class UnbiasedCrossEntropy(nn.Module):
    """MiB's unbiased cross-entropy (UNCE).

    Args:
        n_old: number of teacher channels, background included (``>= 1``).
        ignore_index: label value excluded from the loss (e.g. nnU-Net's ignore label), or None.

    Inputs of ``forward(logits, target)``:
        logits: ``(B, C_total, X, Y[, Z])``, ``C_total >= n_old``.
        target: ``(B, 1, X, Y[, Z])`` or ``(B, X, Y[, Z])`` label map, values in ``[0, C_total)`` (or the
            ignore index). Values ``< n_old`` are all read as "background or an old class".

    Returns:
        Mean over the non-ignored voxels of ``-log p_merged(label)``; 0 (with a graph) if every voxel is
        ignored.

    Raises:
        ValueError: bad ``n_old``/``ignore_index``, bad shapes, labels outside ``[0, C_total)`` (label values are
            checked on CPU tensors, or everywhere with ``nnUNet_cimis_debug_checks=1``; see
            :mod:`nnunetv2_cimis.losses.common`).
    """

    def __init__(self, n_old: int, ignore_index: Optional[int] = None):
        super().__init__()
        self.n_old = _check_n_old(n_old)
        self.ignore_index = _check_ignore(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits("logits", logits)
        merged_labels, valid = _merged_labels(logits, target, self.n_old, self.ignore_index)
        log_p = merge_old_into_background(logits.float(), self.n_old)
        nll = -log_p.gather(1, merged_labels[:, None])[:, 0]
        if valid is None:
            return nll.mean()
        # mean over the valid voxels without reading their count on the host (no device synchronisation);
        # 0 with a graph when every voxel is ignored
        return torch.where(valid, nll, torch.zeros_like(nll)).sum() / valid.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"n_old={self.n_old}, ignore_index={self.ignore_index}"


class UnbiasedKnowledgeDistillation(nn.Module):
    """MiB's unbiased knowledge distillation (UNKD).

    ``L = -(1/|I|) sum_i (1/n_old) [ q_t(i,0) log(p(i,0) + sum_{k new} p(i,k)) + sum_{c old} q_t(i,c) log p(i,c) ]``
    with ``p = softmax(z_student)`` over all channels and ``q_t = softmax(alpha * z_teacher)``.

    Args:
        n_old: number of teacher channels, background included (``>= 1``).
        alpha: factor on the teacher logits before the softmax (MiB's ``--alpha``), > 0. Default 1.0.

    Inputs of ``forward(student_logits, teacher_logits)``:
        student_logits: ``(B, C_total, X, Y[, Z])``, ``C_total >= n_old``.
        teacher_logits: ``(B, n_old, X, Y[, Z])``, same batch and spatial sizes (detached here).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: bad arguments, a teacher whose channel count is not ``n_old``, mismatched shapes.
    """

    def __init__(self, n_old: int, alpha: float = 1.0):
        super().__init__()
        self.n_old = _check_n_old(n_old)
        self.alpha = check_positive("alpha", alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        check_student_teacher(student_logits, teacher_logits)
        if teacher_logits.shape[1] != self.n_old:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must have n_old={self.n_old} channels")
        if student_logits.shape[1] < self.n_old:
            raise ValueError(f"student_logits {tuple(student_logits.shape)} has fewer channels than n_old={self.n_old}")
        log_p = merge_new_into_background(student_logits.float(), self.n_old)
        q = torch.softmax(self.alpha * teacher_logits.detach().float(), dim=1)
        return -(q * log_p).sum(dim=1).mean() / self.n_old

    def extra_repr(self) -> str:
        return f"n_old={self.n_old}, alpha={self.alpha}"


class UnbiasedDiceCELoss(nn.Module):
    """UNCE + a soft Dice on the same merged distribution (nnU-Net's Dice+CE made unbiased).

    Channel 0 of the merged distribution is ``p(bg) + sum_{c old} p(c)``, compared with label 0; then one
    channel per new class, compared with its label. Old classes get no Dice term of their own: in the new
    data they have no labels, and a Dice against empty targets would drive them to zero.

    Args:
        n_old: number of teacher channels, background included (``>= 1``).
        weight_ce: weight of UNCE (nnU-Net: 1). Default 1.0.
        weight_dice: weight of the Dice term (nnU-Net: 1). Default 1.0.
        batch_dice: nnU-Net's ``batch_dice`` (from the plans). Default False.
        smooth: Dice smoothing (nnU-Net: 1e-5).
        include_background: include the merged bg+old channel in the Dice mean. Default True: this is what
            makes label 0 count in the Dice; nnU-Net's own Dice leaves background out (``do_bg=False``), and
            with ``False`` the Dice covers only the new classes.
        ignore_index: label value excluded from both terms, or None.

    Inputs of ``forward(logits, target)``: as :class:`UnbiasedCrossEntropy`.

    Returns:
        ``weight_ce * UNCE + weight_dice * (-Dice)`` (nnU-Net's sign convention for Dice).

    Raises:
        ValueError: bad arguments or shapes.
    """

    def __init__(self, n_old: int, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = False,
                 smooth: float = 1e-5, include_background: bool = True, ignore_index: Optional[int] = None):
        super().__init__()
        self.n_old = _check_n_old(n_old)
        for name, v in (("weight_ce", weight_ce), ("weight_dice", weight_dice), ("smooth", smooth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)
        self.batch_dice = bool(batch_dice)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.ignore_index = _check_ignore(ignore_index)
        self.ce = UnbiasedCrossEntropy(n_old, ignore_index=ignore_index)

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unbiased Dice term alone (``-Dice`` on the merged distribution)."""
        check_logits("logits", logits)
        merged_labels, valid = _merged_labels(logits, target, self.n_old, self.ignore_index)
        probs = merge_old_into_background(logits.float(), self.n_old).exp()
        if not self.include_background and probs.shape[1] < 2:
            raise ValueError(f"include_background=False but there is no new class (n_old={self.n_old}, logits "
                             f"{tuple(logits.shape)})")
        return soft_dice_loss(probs, merged_labels, valid, self.batch_dice, self.smooth, self.include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_ce:
            loss = loss + self.weight_ce * self.ce(logits, target)
        if self.weight_dice:
            loss = loss + self.weight_dice * self.dice(logits, target)
        return loss

    def extra_repr(self) -> str:
        return (f"n_old={self.n_old}, weight_ce={self.weight_ce}, weight_dice={self.weight_dice}, "
                f"batch_dice={self.batch_dice}, include_background={self.include_background}, "
                f"ignore_index={self.ignore_index}")

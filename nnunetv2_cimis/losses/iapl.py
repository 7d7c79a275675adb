"""Loss of IAPL (Liang, Zhou et al., IJCAI 2024 / arXiv 2507.07602).

* Main term, on the dynamic heads' full-resolution logits ``(B, K, X, Y[, Z])``: per-class binary
  cross-entropy (sigmoid, one-hot targets, every class including background) plus soft Dice on the sigmoid
  probabilities, averaged over the foreground classes 1..K-1 and per image (*choice*: background left out of
  the Dice, as nnU-Net does).
* Auxiliary terms, on every intermediate transformer prediction (log-probabilities ``(B, K, x, y[, z])``
  at their own, usually lower, resolution): ``aux_weight`` (0.05, the official code's) times (cross-entropy +
  soft Dice on the probabilities over the foreground classes); the target is resized nearest-neighbour to each
  prediction. The terms are summed over the intermediate predictions (*choice*: the official code supervises
  two of them, the last layer of each of the two finest transformer scales, with 0.05 x their mean; here every
  layer's prediction feeds the next layer's purity filter, so every one is supervised; docs/methods_iapl.md).

Both Dice terms are the package's one soft Dice (:func:`nnunetv2_cimis.losses.dice.soft_dice_loss`, per image,
background left out, as ``1 - Dice``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cimis.losses.common import check_label_range, check_logits, labels_to_index, resize_labels_nearest
from nnunetv2_cimis.losses.dice import soft_dice_loss


class IAPLLoss(nn.Module):
    """Dice + BCE per class on the final logits, plus ``aux_weight`` * (CE + Dice) on intermediate predictions.

    Args:
        num_classes: ``K`` (background included), ``>= 2``.
        aux_weight: weight of each auxiliary CE+Dice term (default 0.05).
        bce_weight: weight of the main BCE (default 1).
        dice_weight: weight of the main Dice (default 1).
        smooth: Dice smoothing (default 1e-5).

    Forward:
        logits: ``(B, K, X, Y[, Z])`` final logits.
        target: ``(B, 1, X, Y[, Z])`` (nnU-Net, float) or ``(B, X, Y[, Z])`` label map with values in [0, K).
        aux_log_probs: sequence of ``(B, K, x, y[, z])`` log-probabilities (may be empty).

    Returns:
        a scalar tensor.

    Raises:
        ValueError: bad options in the constructor; wrong channel counts, mismatching batch/spatial sizes or
            labels outside [0, K) in ``forward``.
    """

    def __init__(self, num_classes: int, aux_weight: float = 0.05, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1e-5):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background + one class), got {num_classes!r}")
        for name, v in (("aux_weight", aux_weight), ("bce_weight", bce_weight), ("dice_weight", dice_weight)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.num_classes = int(num_classes)
        self.aux_weight = float(aux_weight)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        check_label_range(labels, self.num_classes, name="target (ignore labels are not supported)")
        return torch.movedim(F.one_hot(labels, self.num_classes), -1, 1)

    def _dice(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``1 - mean_{b, k>=1} Dice``: the package's soft Dice per image over the foreground channels."""
        return 1 + soft_dice_loss(probs, labels, smooth=self.smooth, include_background=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                aux_log_probs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        check_logits("logits", logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, the loss was built for {self.num_classes}: "
                             f"shape {tuple(logits.shape)}")
        labels = labels_to_index(target, logits)
        one_hot = self._one_hot(labels)
        logits_f = logits.float()
        loss = self.bce_weight * F.binary_cross_entropy_with_logits(logits_f, one_hot.float())
        loss = loss + self.dice_weight * self._dice(torch.sigmoid(logits_f), labels)
        if self.aux_weight > 0:
            for i, lp in enumerate(aux_log_probs):
                check_logits(f"aux_log_probs[{i}]", lp)
                if lp.shape[0] != logits.shape[0] or lp.shape[1] != self.num_classes or lp.ndim != logits.ndim:
                    raise ValueError(f"aux_log_probs[{i}] {tuple(lp.shape)} must be (B={logits.shape[0]}, "
                                     f"K={self.num_classes}, ...) like the logits {tuple(logits.shape)}")
                small = resize_labels_nearest(labels, lp.shape[2:])
                lp = lp.float()
                ce = F.nll_loss(lp, small)
                dice = self._dice(lp.exp(), small)
                loss = loss + self.aux_weight * (ce + dice)
        return loss

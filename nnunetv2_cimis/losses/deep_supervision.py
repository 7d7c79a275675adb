"""Deep supervision: one per-scale loss applied over nnU-Net's list of outputs.

nnU-Net's U-Net returns one logit map per decoder scale (highest resolution first) and its trainer wraps
the segmentation loss in ``DeepSupervisionWrapper`` with the weights ``1 / 2**i``, the last (coarsest) one
set to 0, normalised to sum 1. Every incremental loss that acts on logits (distillation, unbiased or
pseudo-labelled segmentation) uses the same weights through :func:`apply_over_scales`, so that old and new
knowledge are balanced the same way at every scale as nnU-Net balances its own loss.

The trainers take the weights from nnU-Net's own ``DeepSupervisionWrapper`` (the base trainer's
``deep_supervision_weights``) and pass them in. This module has no nnU-Net import:
:func:`deep_supervision_weights` recomputes them with nnU-Net's formula for unit tests and standalone use.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch


def deep_supervision_weights(n_scales: int) -> List[float]:
    """nnU-Net's deep-supervision weights for ``n_scales`` outputs.

    ``w_i = 1 / 2**i`` for ``i = 0 .. n_scales - 1``, then ``w_{n-1} = 0`` and the weights are normalised to
    sum 1 (nnU-Net's ``nnUNetTrainer._build_loss``). With a single scale (deep supervision off) the weight
    is ``[1.0]``.

    Args:
        n_scales: number of outputs, ``>= 1``.

    Raises:
        ValueError: if ``n_scales`` is not a positive integer.
    """
    if isinstance(n_scales, bool) or not isinstance(n_scales, int) or n_scales < 1:
        raise ValueError(f"n_scales must be a positive integer, got {n_scales!r}")
    if n_scales == 1:
        return [1.0]
    w = [1.0 / (2 ** i) for i in range(n_scales)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def apply_over_scales(fn: Callable[..., torch.Tensor], weights: Sequence[float], *lists) -> torch.Tensor:
    """``sum_i weights[i] * fn(lists[0][i], lists[1][i], ...)`` over the scales with a non-zero weight.

    Args:
        fn: per-scale loss, called with the ``i``-th element of every list; returns a scalar tensor.
        weights: one weight per scale (e.g. :func:`deep_supervision_weights`); scales with weight 0 are
            skipped (``fn`` is not called), as in nnU-Net's ``DeepSupervisionWrapper``.
        *lists: lists (or tuples) over scales, highest resolution first, all as long as ``weights``. An
            element may be ``None`` (passed through to ``fn``).

    Returns:
        The weighted sum, a scalar tensor.

    Raises:
        ValueError: if no list is given, a list is not a list/tuple, or the lengths differ.
    """
    if not lists:
        raise ValueError("apply_over_scales needs at least one list of per-scale inputs")
    n = len(weights)
    if n == 0:
        raise ValueError("weights is empty")
    for k, lst in enumerate(lists):
        if not isinstance(lst, (list, tuple)):
            raise ValueError(f"argument {k} must be a list over deep-supervision scales, got "
                             f"{type(lst).__name__}; wrap a single tensor as [tensor] and use weights [1.0]")
        if len(lst) != n:
            raise ValueError(f"argument {k} has {len(lst)} scales but {n} weights were given; pass "
                             f"deep_supervision_weights({len(lst)}) or lists of equal length")
    total = None
    for i, w in enumerate(weights):
        if w == 0:
            continue
        term = w * fn(*[lst[i] for lst in lists])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("all deep-supervision weights are zero")
    return total

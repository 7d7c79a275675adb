"""Image priors of MOSInversion's optimisation: feature-statistics matching and total variation.

* :class:`FeatureStatisticsLoss`: DeepInversion's (Yin et al., CVPR 2020) feature-statistics term in MOSInversion's
  form: at every normalisation layer, the distance between the per-channel mean / variance of the synthetic
  batch's layer input (recorded by :class:`~nnunetv2_cimis.networks.norm_statistics.NormInputRecorder`) and the
  statistics stored in the step memory (``StepMemory.norm_stats``), the first layer weighted 10x.
* :class:`TotalVariationPrior`: DeepInversion's total-variation priors over all neighbour directions (13 in 3D,
  4 in 2D), an L1 term (mean absolute difference) and an L2 term (Euclidean norm of the differences).

Plain PyTorch; no nnU-Net import.
"""
from __future__ import annotations

import itertools
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from nnunetv2_cimis.networks.norm_statistics import pool_statistics

__all__ = ["FeatureStatisticsLoss", "neighbour_offsets", "neighbour_differences", "TotalVariationPrior"]


class FeatureStatisticsLoss(nn.Module):
    """DeepInversion's feature-statistics loss against stored per-channel statistics (MOSInversion variant).

    For each layer ``l`` with ``C_l`` channels::

        r_l = (||mu_l - mu*_l||_2 + ||var_l - var*_l||_2) / C_l

    where ``mu_l, var_l`` are the mean and biased variance of the layer's input over the batch and all voxels
    and ``mu*_l, var*_l`` the stored ones. The loss is ``sum_l w_l r_l / L`` with ``w = first_layer_weight`` for
    the first layer of ``layer_order`` and 1 for the others.

    Args:
        target_stats: layer name -> ``{"mean": (C,), "var": (C,)}`` (``StepMemory.norm_stats``).
        layer_order: the layers to use, first = closest to the input. Default: the keys of ``target_stats``
            in their order.
        first_layer_weight: weight of the first layer (default 10, as in MOSInversion).

    Raises:
        ValueError: empty or malformed ``target_stats``, a layer of ``layer_order`` without target, a negative
            weight; in ``forward``: a layer missing from the batch statistics or a channel-count mismatch.
    """

    def __init__(self, target_stats: Mapping[str, Mapping[str, torch.Tensor]],
                 layer_order: Optional[Sequence[str]] = None, first_layer_weight: float = 10.0):
        super().__init__()
        if not target_stats:
            raise ValueError("target_stats is empty: the step memory holds no normalisation statistics")
        order = list(target_stats) if layer_order is None else list(layer_order)
        if not order:
            raise ValueError("layer_order is empty")
        for n in order:
            if n not in target_stats:
                raise ValueError(f"layer {n!r} has no stored statistics; stored: {list(target_stats)[:5]}...")
            s = target_stats[n]
            if not isinstance(s, Mapping) or "mean" not in s or "var" not in s:
                raise ValueError(f"target_stats[{n!r}] must be a dict with 'mean' and 'var', got {s!r}"[:300])
            if s["mean"].ndim != 1 or s["mean"].shape != s["var"].shape:
                raise ValueError(f"target_stats[{n!r}] mean {tuple(s['mean'].shape)} and var "
                                 f"{tuple(s['var'].shape)} must both be (C,)")
        if first_layer_weight < 0:
            raise ValueError(f"first_layer_weight must be >= 0, got {first_layer_weight}")
        self.layer_order = order
        self.first_layer_weight = float(first_layer_weight)
        for i, n in enumerate(order):
            self.register_buffer(f"_mean_{i}", target_stats[n]["mean"].detach().float().clone(), persistent=False)
            self.register_buffer(f"_var_{i}", target_stats[n]["var"].detach().float().clone(), persistent=False)

    def target(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"_mean_{i}"), getattr(self, f"_var_{i}")

    def per_layer(self, batch_stats: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Unweighted ``r_l`` for every layer, ``(L,)``. ``batch_stats[name] = (mean, var)``, ``(B, C)`` or ``(C,)``."""
        out = []
        for i, n in enumerate(self.layer_order):
            if n not in batch_stats:
                raise ValueError(f"no statistics recorded for layer {n!r}: run the network forward with a "
                                 f"NormInputRecorder on these layers first")
            mean, var = pool_statistics(*batch_stats[n])
            t_mean, t_var = self.target(i)
            if mean.shape != t_mean.shape:
                raise ValueError(f"layer {n!r}: batch statistics have {tuple(mean.shape)} channels but the stored "
                                 f"ones {tuple(t_mean.shape)}; teacher and step memory differ in architecture")
            c = mean.shape[0]
            out.append((torch.linalg.vector_norm(mean - t_mean) + torch.linalg.vector_norm(var - t_var)) / c)
        return torch.stack(out)

    def forward(self, batch_stats: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        r = self.per_layer(batch_stats)
        w = torch.ones_like(r)
        w[0] = self.first_layer_weight
        return (w * r).sum() / r.shape[0]


def neighbour_offsets(spatial_dims: int) -> List[Tuple[int, ...]]:
    """The neighbour directions of a voxel up to sign: 13 in 3D, 4 in 2D (first non-zero component positive)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    offs = []
    for o in itertools.product((-1, 0, 1), repeat=spatial_dims):
        nz = [v for v in o if v != 0]
        if nz and nz[0] > 0:
            offs.append(o)
    return offs


def neighbour_differences(x: torch.Tensor) -> List[torch.Tensor]:
    """``x[p + o] - x[p]`` for every neighbour direction ``o`` (:func:`neighbour_offsets`), valid voxels only."""
    nd = x.ndim - 2
    diffs = []
    for o in neighbour_offsets(nd):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        for v in o:
            if v == 1:
                a.append(slice(1, None)); b.append(slice(None, -1))
            elif v == -1:
                a.append(slice(None, -1)); b.append(slice(1, None))
            else:
                a.append(slice(None)); b.append(slice(None))
        diffs.append(x[tuple(a)] - x[tuple(b)])
    return diffs


class TotalVariationPrior(nn.Module):
    """Total-variation image priors of DeepInversion over all neighbour directions.

    ``l1 = sum_o mean|x[p+o] - x[p]|`` and ``l2 = sum_o ||x[p+o] - x[p]||_2`` over the 13 (3D) or 4 (2D)
    directions ``o``; the loss is ``l1_weight * l1 + l2_weight * l2``.

    Args:
        l1_weight: default 2.5e-5 (MOSInversion).
        l2_weight: default 3e-8 (MOSInversion).

    Input: ``(B, C, X, Y)`` or ``(B, C, X, Y, Z)``, every spatial size >= 2.

    Raises:
        ValueError: a negative weight; in ``forward`` a tensor that is not 4D/5D or has a spatial size < 2.
    """

    def __init__(self, l1_weight: float = 2.5e-5, l2_weight: float = 3e-8):
        super().__init__()
        if l1_weight < 0 or l2_weight < 0:
            raise ValueError(f"TV weights must be >= 0, got l1_weight={l1_weight}, l2_weight={l2_weight}")
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)

    def terms(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unweighted ``(l1, l2)`` terms."""
        if x.ndim not in (4, 5) or min(x.shape[2:]) < 2:
            raise ValueError(f"expected (B, C, X, Y[, Z]) with spatial sizes >= 2, got shape {tuple(x.shape)}")
        diffs = neighbour_differences(x)
        l1 = sum(d.abs().mean() for d in diffs)
        l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
        return l1, l2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1, l2 = self.terms(x)
        return self.l1_weight * l1 + self.l2_weight * l2

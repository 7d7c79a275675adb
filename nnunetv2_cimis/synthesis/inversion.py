"""Mask-conditioned DeepInversion: synthetic old-class volumes from a trained segmentation network.

MOSInversion (Kim et al., "Mask-conditioned Organ Synthesis by Inversion", Comput. Biol. Med. 2025) replays
old classes without stored images: a synthetic volume ``x`` (the only optimised tensor, Gaussian start) is
optimised with Adam so that the frozen previous-step network (the *teacher*)

* segments ``x`` as a given conditioning mask (a real label map of the earlier step, augmented by flips,
  elastic and affine deformation): soft Dice of the teacher's softmax against the mask;
* sees, at every normalisation layer, inputs whose per-channel mean and variance match the statistics
  recorded over the earlier step's training data (DeepInversion, Yin et al. CVPR 2020): per layer
  ``(||mu - mu*||_2 + ||var - var*||_2) / C``, the first layer weighted 10x, averaged over layers;
* is smooth: total-variation priors over all neighbour directions (13 in 3D, 4 in 2D), an L1 term
  (mean absolute difference) and an L2 term (Euclidean norm of the differences).

The teacher's argmax on the final ``x`` becomes the synthetic volume's label. nnU-Net's networks use
InstanceNorm, which keeps no running statistics; the target statistics therefore come from the step memory
(``StepMemory.norm_stats``: mean / variance of every normalisation layer's input over the step's training
patches), see :mod:`nnunetv2_cimis.memory.step_memory`.

Defaults follow the method: Adam lr 0.1, 2000 iterations, Dice weight 1, statistics weight 1 with the first
layer x10, TV L1 2.5e-5, TV L2 3e-8. The poly learning-rate decay (power 0.9) is what the first author's
public generation code does; ``lr_schedule="constant"`` switches it off.

This module is plain PyTorch (plus ``batchgenerators`` for the mask deformation); no nnU-Net import.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#: module types whose input statistics are recorded / matched
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def find_norm_layers(network: nn.Module) -> List[str]:
    """Names (as in ``named_modules``, wrapper prefixes removed) of every normalisation layer, in module order.

    Normalisation layers are instances of BatchNorm / InstanceNorm (``_NormBase``), ``GroupNorm`` or
    ``LayerNorm``.
    """
    return [_strip_wrappers(n) for n, m in network.named_modules() if isinstance(m, NORM_TYPES)]


def channel_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance of a ``(B, C, ...)`` tensor.

    Returns:
        ``(mean, var)``, each ``(B, C)``, computed over the spatial dimensions in float32.
    """
    if x.ndim < 3:
        raise ValueError(f"expected a (B, C, X[, Y, Z]) tensor, got shape {tuple(x.shape)}")
    f = x.float().flatten(2)
    return f.mean(dim=2), f.var(dim=2, unbiased=False)


def pool_statistics(mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool per-sample ``(B, C)`` statistics of equally sized samples into ``(C,)`` batch statistics.

    ``mean = mean_b(m_b)``, ``var = mean_b(v_b + m_b^2) - mean^2`` (the variance over all voxels of the batch).
    """
    if mean.ndim == 1:
        return mean, var
    m = mean.mean(dim=0)
    v = (var + mean ** 2).mean(dim=0) - m ** 2
    return m, v.clamp_min(0)


class NormInputRecorder:
    """Forward hooks recording the per-channel statistics of the input of normalisation layers.

    Use as a context manager (the hooks are removed on exit) or call :meth:`close`. After every forward
    pass, ``self.stats[name] = (mean, var)``, each ``(B, C)`` and differentiable w.r.t. the network input.

    Args:
        network: the network (wrapped networks are fine: ``_orig_mod.`` / ``module.`` prefixes are removed).
        module_names: names of the layers to record; default: every normalisation layer
            (:func:`find_norm_layers`).

    Raises:
        ValueError: a requested name is not a module of ``network`` (the message lists a few that are).
    """

    def __init__(self, network: nn.Module, module_names: Optional[Sequence[str]] = None):
        modules = {_strip_wrappers(n): m for n, m in network.named_modules()}
        names = find_norm_layers(network) if module_names is None else list(module_names)
        missing = [n for n in names if n not in modules]
        if missing:
            known = find_norm_layers(network)[:5]
            raise ValueError(f"modules {missing[:5]} are not in the network; its normalisation layers are e.g. "
                             f"{known}. Teacher network and statistics must come from the same architecture.")
        # keep the network's module order (the first recorded layer is the one closest to the input)
        order = {n: i for i, n in enumerate(modules)}
        self.names: List[str] = sorted(names, key=lambda n: order[n])
        self.stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def fn(module, inputs, output):
            self.stats[name] = channel_statistics(inputs[0])
        return fn

    def clear(self) -> None:
        self.stats = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "NormInputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def soft_dice_loss(probabilities: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``1 -`` mean soft Dice of ``probabilities`` against the integer ``mask``, over the classes present.

    Dice is computed per class over the whole batch (nnU-Net's "batch Dice"):
    ``(2 sum p*g + smooth) / (sum p + sum g + smooth)``, and averaged over the classes that occur in ``mask``
    (background included). Absent classes are pushed down by the softmax through the present ones.

    Args:
        probabilities: ``(B, K, ...)`` softmax.
        mask: ``(B, ...)`` integer labels in ``[0, K)``.
    """
    if mask.shape[0] != probabilities.shape[0] or mask.shape[1:] != probabilities.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, ...) matching probabilities "
                         f"{tuple(probabilities.shape)}")
    k = probabilities.shape[1]
    if mask.min() < 0 or mask.max() >= k:
        raise ValueError(f"mask values must be in [0, {k}), got [{int(mask.min())}, {int(mask.max())}]")
    onehot = F.one_hot(mask.long(), k).movedim(-1, 1).to(probabilities.dtype)
    dims = [0] + list(range(2, probabilities.ndim))
    inter = (probabilities * onehot).sum(dims)
    denom = probabilities.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    present = onehot.sum(dims) > 0
    return 1 - dice[present].mean()


def hard_dice_per_class(prediction: torch.Tensor, mask: torch.Tensor) -> Dict[int, float]:
    """Dice of two integer label maps of the same shape for every foreground label occurring in either.

    Returns ``{label: dice}``; empty when both maps are all background.
    """
    if prediction.shape != mask.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and mask {tuple(mask.shape)} differ in shape")
    labels = sorted((set(torch.unique(prediction).tolist()) | set(torch.unique(mask).tolist())) - {0})
    out = {}
    for v in labels:
        p, g = prediction == v, mask == v
        denom = int(p.sum()) + int(g.sum())
        out[int(v)] = 2.0 * int((p & g).sum()) / denom if denom else float("nan")
    return out


# --------------------------------------------------------------------------------------------- masks
@dataclass
class MaskAugmentation:
    """Random variation of a conditioning mask: flips, then elastic deformation, rotation and scaling.

    Uses ``batchgenerators.augmentations.spatial_transformations.augment_spatial`` (nearest neighbour on the
    labels, constant 0 outside). Probabilities are per mask; angles in radians, about every axis in 3D.
    All values are [open] choices (MOSInversion states only "flips, elastic and affine").
    """

    p_flip: float = 0.5  # per axis
    p_elastic: float = 0.3
    elastic_alpha: Tuple[float, float] = (0.0, 200.0)
    elastic_sigma: Tuple[float, float] = (9.0, 13.0)
    p_rotation: float = 0.5
    max_angle: float = math.pi / 12  # 15 degrees
    p_scale: float = 0.5
    scale: Tuple[float, float] = (0.85, 1.15)

    def __post_init__(self):
        for n in ("p_flip", "p_elastic", "p_rotation", "p_scale"):
            v = getattr(self, n)
            if not 0 <= v <= 1:
                raise ValueError(f"{n} must be in [0, 1], got {v}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")

    def __call__(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of the integer ``mask`` (spatial shape unchanged, dtype uint8)."""
        from batchgenerators.augmentations.spatial_transformations import augment_spatial

        m = np.asarray(mask)
        if m.ndim == 4 and m.shape[0] == 1:  # (1, X, Y, Z): a channel axis
            m = m[0]
        if m.ndim not in (2, 3):
            raise ValueError(f"a conditioning mask must be 2D or 3D, got shape {m.shape}")
        for axis in range(m.ndim):
            if rng.uniform() < self.p_flip:
                m = np.flip(m, axis)
        m = np.ascontiguousarray(m)
        do_el, do_rot, do_sc = (rng.uniform() < p for p in (self.p_elastic, self.p_rotation, self.p_scale))
        if not (do_el or do_rot or do_sc):
            return m.astype(np.uint8)
        # augment_spatial draws from numpy's global generator: seed it from rng, restore it afterwards
        state = np.random.get_state()
        np.random.seed(int(rng.integers(0, 2 ** 31 - 1)))
        try:
            a = self.max_angle
            seg = m[None, None].astype(np.float32)
            _, out = augment_spatial(
                np.zeros_like(seg), seg,
                patch_size=m.shape, random_crop=False,
                do_elastic_deform=do_el, alpha=self.elastic_alpha, sigma=self.elastic_sigma,
                do_rotation=do_rot, angle_x=(-a, a), angle_y=(-a, a), angle_z=(-a, a),
                do_scale=do_sc, scale=self.scale, order_data=0, order_seg=0,
                border_mode_seg="constant", border_cval_seg=0)
        finally:
            np.random.set_state(state)
        return np.rint(out[0, 0]).astype(np.uint8)


def sanitize_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels a network with ``num_classes`` outputs cannot produce (>= num_classes, e.g. 255 for 'outside')
    become background."""
    m = np.asarray(mask).astype(np.int64)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    m[(m < 0) | (m >= num_classes)] = 0
    return m


# --------------------------------------------------------------------------------------------- inversion
@dataclass
class InversionConfig:
    """Settings of :func:`invert` (defaults: MOSInversion's).

    Attributes:
        iterations: Adam steps (default 2000).
        lr: Adam learning rate (0.1).
        lr_schedule: ``"poly"`` (lr * (1 - i/n)^0.9, as in the first author's code) or ``"constant"``.
        dice_weight: weight of the Dice term (1).
        stats_weight: weight of the feature-statistics term (1).
        first_layer_weight: extra weight of the first normalisation layer (10).
        tv_l1_weight, tv_l2_weight: total-variation priors (2.5e-5, 3e-8).
        init_std: standard deviation of the Gaussian start (1: nnU-Net's z-scored intensities).
    """

    iterations: int = 2000
    lr: float = 0.1
    lr_schedule: str = "poly"
    dice_weight: float = 1.0
    stats_weight: float = 1.0
    first_layer_weight: float = 10.0
    tv_l1_weight: float = 2.5e-5
    tv_l2_weight: float = 3e-8
    init_std: float = 1.0

    def __post_init__(self):
        if int(self.iterations) < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("poly", "constant"):
            raise ValueError(f"lr_schedule must be 'poly' or 'constant', got {self.lr_schedule!r}")
        for n in ("dice_weight", "stats_weight", "first_layer_weight", "tv_l1_weight", "tv_l2_weight", "init_std"):
            if getattr(self, n) < 0:
                raise ValueError(f"{n} must be >= 0, got {getattr(self, n)}")


@dataclass
class InversionResult:
    """What :func:`invert` returns (all on CPU).

    Attributes:
        images: ``(B, C_in, ...)`` synthetic volumes.
        labels: ``(B, ...)`` uint8 teacher argmax on them.
        losses: total loss per iteration (before each step), length ``iterations``.
        reports: per volume: ``dice`` (teacher argmax vs its mask, per label), ``mean_dice``,
            ``stats_distance`` and ``stats_distance_start`` (FeatureStatisticsLoss of that volume alone),
            ``final_loss``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    losses: List[float] = field(default_factory=list)
    reports: List[dict] = field(default_factory=list)


def _first_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _per_volume_stats(stats_loss: FeatureStatisticsLoss, recorded, b: int) -> List[float]:
    out = []
    for i in range(b):
        one = {n: (m[i:i + 1].detach(), v[i:i + 1].detach()) for n, (m, v) in recorded.items()}
        out.append(float(stats_loss(one)))
    return out


def invert(network: nn.Module, masks: torch.Tensor, target_stats: Mapping[str, Mapping[str, torch.Tensor]],
           num_input_channels: int, config: Optional[InversionConfig] = None,
           generator: Optional[torch.Generator] = None, init: Optional[torch.Tensor] = None,
           progress: Optional[Callable[[int, float], None]] = None) -> InversionResult:
    """Optimise synthetic volumes so that the frozen ``network`` segments them as ``masks``.

    The network is put in eval mode (its mode is restored afterwards) and never updated: gradients are
    taken with respect to the image only. Autocast is not used.

    Args:
        network: the teacher; returns logits ``(B, K, ...)`` or a list of them (deep supervision: the first,
            highest-resolution one is used).
        masks: ``(B, X, Y[, Z])`` integer conditioning masks with values in ``[0, K)``.
        target_stats: ``StepMemory.norm_stats`` (layer name -> ``{"mean", "var"}``); the names must be
            modules of ``network`` (prefixes ``_orig_mod.`` / ``module.`` ignored).
        num_input_channels: ``C_in`` of the network input.
        config: :class:`InversionConfig` (defaults: the method's).
        generator: random generator of the Gaussian start (on the masks' device).
        init: optional ``(B, C_in, ...)`` start instead of Gaussian noise.
        progress: called as ``progress(iteration, loss)`` after every step.

    Raises:
        ValueError: bad shapes, mask values outside the network's classes, statistics that do not fit the
            network.
    """
    cfg = config or InversionConfig()
    if masks.ndim not in (3, 4):
        raise ValueError(f"masks must be (B, X, Y) or (B, X, Y, Z), got shape {tuple(masks.shape)}")
    if num_input_channels < 1:
        raise ValueError(f"num_input_channels must be >= 1, got {num_input_channels}")
    device = masks.device
    shape = (masks.shape[0], num_input_channels) + tuple(masks.shape[1:])
    if init is not None:
        if tuple(init.shape) != shape:
            raise ValueError(f"init must have shape {shape}, got {tuple(init.shape)}")
        x = init.detach().to(device=device, dtype=torch.float32).clone()
    else:
        x = torch.randn(shape, generator=generator, device=device) * cfg.init_std
    x.requires_grad_(True)
    masks = masks.long()

    was_training = network.training
    network.eval()
    recorder = NormInputRecorder(network, list(target_stats))
    stats_loss = FeatureStatisticsLoss(target_stats, recorder.names, cfg.first_layer_weight).to(device)
    tv = TotalVariationPrior(cfg.tv_l1_weight, cfg.tv_l2_weight)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    losses: List[float] = []
    start_dist: Optional[List[float]] = None
    n = int(cfg.iterations)

    def objective():
        recorder.clear()
        logits = _first_output(network(x))
        if logits.shape[0] != masks.shape[0] or logits.shape[2:] != masks.shape[1:]:
            raise ValueError(f"network output {tuple(logits.shape)} does not match masks {tuple(masks.shape)}")
        probs = torch.softmax(logits.float(), dim=1)
        loss = cfg.dice_weight * soft_dice_loss(probs, masks)
        if cfg.stats_weight > 0:
            loss = loss + cfg.stats_weight * stats_loss(recorder.stats)
        if cfg.tv_l1_weight > 0 or cfg.tv_l2_weight > 0:
            loss = loss + tv(x)
        return loss, logits

    try:
        with torch.enable_grad():
            for i in range(n):
                if cfg.lr_schedule == "poly":
                    for g in opt.param_groups:
                        g["lr"] = cfg.lr * (1 - i / n) ** 0.9
                loss, _ = objective()
                if start_dist is None:
                    start_dist = _per_volume_stats(stats_loss, recorder.stats, shape[0])
                (grad,) = torch.autograd.grad(loss, x)
                x.grad = grad
                opt.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(i, losses[-1])
        with torch.no_grad():
            final_loss, logits = objective()
            labels = logits.argmax(1)
            end_dist = _per_volume_stats(stats_loss, recorder.stats, shape[0])
    finally:
        recorder.close()
        network.train(was_training)

    if start_dist is None:
        start_dist = end_dist
    reports = []
    for b in range(shape[0]):
        dice = hard_dice_per_class(labels[b].cpu(), masks[b].cpu())
        finite = [v for v in dice.values() if not math.isnan(v)]
        reports.append({"dice": {str(k): v for k, v in dice.items()},
                        "mean_dice": float(np.mean(finite)) if finite else float("nan"),
                        "stats_distance": end_dist[b], "stats_distance_start": start_dist[b],
                        "final_loss": float(final_loss), "iterations": n})
    return InversionResult(images=x.detach().cpu(), labels=labels.to(torch.uint8).cpu(), losses=losses,
                           reports=reports)


def conditioning_masks(memory) -> List[np.ndarray]:
    """The masks a step memory offers for conditioning: its ``label_bank`` plus the masks carried from earlier
    steps under ``extra["inversion_label_bank"]`` (written by ``nnUNetTrainerMOSInv.extend_step_memory``)."""
    masks = list(memory.label_bank or [])
    masks += list((memory.extra or {}).get("inversion_label_bank", []) or [])
    return masks


# --------------------------------------------------------------------------------------------- sets on disk
SYNTHESIS_MANIFEST = "synthesis.json"
SYNTHESIS_SUMMARY = "summary.json"
SET_FORMAT_VERSION = 1
#: manifest entries that are information only (not compared when a set is resumed or reused)
MANIFEST_INFO_KEYS = ("num_volumes", "teacher_checkpoint", "created_by")


def volume_name(i: int) -> str:
    return f"volume_{i:04d}"


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (identifies the teacher checkpoint a synthetic set was made from)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def existing_volumes(folder: str) -> List[int]:
    """Indices of the complete volumes (``volume_XXXX.npz`` with its report) in ``folder``."""
    import os
    import re

    if not os.path.isdir(folder):
        return []
    out = []
    for f in os.listdir(folder):
        m = re.fullmatch(r"volume_(\d{4,})\.npz", f)
        if m and os.path.isfile(os.path.join(folder, f[:-4] + ".json")):
            out.append(int(m.group(1)))
    return sorted(out)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    import os

    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    import json

    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=2)

    _write_atomic(path, write)


def synthesize_set(network: nn.Module, memory, num_input_channels: int, output_folder: str, num_volumes: int,
                   config: Optional[InversionConfig] = None, batch_size: int = 2, seed: int = 0,
                   augmentation: Optional[MaskAugmentation] = None, num_classes: Optional[int] = None,
                   manifest_extra: Optional[dict] = None, device: Optional[torch.device] = None,
                   show_progress: bool = True, log: Optional[Callable[[str], None]] = None) -> List[int]:
    """Generate ``num_volumes`` synthetic volumes into ``output_folder``; resumable.

    Volume ``i`` is conditioned on mask ``rng.integers(len(masks))`` of :func:`conditioning_masks` varied by
    ``augmentation``, with ``rng`` seeded by ``(seed, i)``, and starts from Gaussian noise seeded the same way,
    so an interrupted run resumes with the same assignment. Volumes already in the folder are kept; missing
    ones are generated ``batch_size`` at a time (batch statistics are pooled over a batch).

    Written per volume: ``volume_XXXX.npz`` (``image`` float32 ``(C_in, *patch)``, ``label`` uint8 teacher
    argmax, ``mask`` uint8 conditioning mask) and ``volume_XXXX.json`` (its report, see
    :class:`InversionResult`); for the set: ``synthesis.json`` (settings, teacher) and ``summary.json``.

    Args:
        network: the teacher (frozen; see :func:`invert`).
        memory: the teacher's ``StepMemory`` (``norm_stats`` and label bank).
        num_input_channels: input channels of the network.
        output_folder: where the set is written (created).
        num_volumes: total number of volumes wanted (>= 1).
        config: inversion settings. batch_size: volumes optimised together. seed: base seed.
        augmentation: mask variation (default :class:`MaskAugmentation()`).
        num_classes: outputs of the network; mask values outside become background (default: the memory's).
        manifest_extra: recorded in ``synthesis.json`` (e.g. ``teacher_fingerprint``); a folder whose manifest
            disagrees on these keys or on the settings is refused (except :data:`MANIFEST_INFO_KEYS`).
        device: where to optimise (default: the network's).

    Returns:
        The indices of all volumes of the set (``0 .. num_volumes - 1``).

    Raises:
        ValueError: bad arguments, a memory without statistics or masks, or a folder made with other settings.
    """
    import json
    import os
    from dataclasses import asdict

    from tqdm import tqdm

    cfg = config or InversionConfig()
    aug = augmentation or MaskAugmentation()
    if num_volumes < 1 or batch_size < 1:
        raise ValueError(f"num_volumes and batch_size must be >= 1, got {num_volumes}, {batch_size}")
    if not memory.norm_stats:
        raise ValueError("the step memory holds no normalisation statistics; recompute it")
    masks = conditioning_masks(memory)
    if not masks:
        raise ValueError("the step memory's label bank is empty: no mask to condition on")
    if num_classes is None:
        num_classes = max(memory.labels) + 1
    shapes = {tuple(sanitize_mask(m, 1).shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"the conditioning masks have different shapes {sorted(shapes)}; every step must use the "
                         f"plans (patch size) of the first step")
    if device is None:
        p = next(network.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    os.makedirs(output_folder, exist_ok=True)
    manifest = {"format_version": SET_FORMAT_VERSION, "config": asdict(cfg), "augmentation": asdict(aug),
                "seed": int(seed), "batch_size": int(batch_size), "num_input_channels": int(num_input_channels),
                "num_classes": int(num_classes),
                "patch_size": [int(v) for v in (memory.patch_size or sanitize_mask(masks[0], 1).shape)],
                "num_masks": len(masks), **(manifest_extra or {})}
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, so comparisons with a loaded one work
    mpath = os.path.join(output_folder, SYNTHESIS_MANIFEST)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        differs = sorted(k for k in set(old) | set(manifest)
                         if k not in MANIFEST_INFO_KEYS and old.get(k) != manifest.get(k))
        if differs:
            raise ValueError(f"{output_folder} holds a synthetic set made with other settings ({differs}); "
                             f"use another output folder or delete it")
    manifest["num_volumes"] = max(int(num_volumes), len(existing_volumes(output_folder)))
    _write_json(mpath, manifest)

    done = set(existing_volumes(output_folder))
    todo = [i for i in range(num_volumes) if i not in done]
    if log is not None:
        log(f"Synthetic set {output_folder}: {len(done)} volumes present, {len(todo)} to generate "
            f"({cfg.iterations} iterations each)")
    bar = tqdm(total=len(todo) * max(int(cfg.iterations), 1), disable=not show_progress or not todo,
               desc="inversion", unit="it")
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            cond, inits = [], []
            for i in idx:
                rng = np.random.default_rng([int(seed), int(i)])
                base = masks[int(rng.integers(len(masks)))]
                cond.append(sanitize_mask(aug(sanitize_mask(base, num_classes).astype(np.uint8), rng), num_classes))
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
                inits.append(torch.randn((num_input_channels,) + cond[-1].shape, generator=g) * cfg.init_std)
            m = torch.from_numpy(np.stack(cond)).long().to(device)
            x0 = torch.stack(inits).to(device)

            def progress(it, loss):
                bar.update(1)
                if it % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}", volumes=f"{idx[0]}-{idx[-1]}")

            res = invert(network, m, memory.norm_stats, num_input_channels, cfg, init=x0, progress=progress)
            for j, i in enumerate(idx):
                name = os.path.join(output_folder, volume_name(i))

                def save_npz(p, j=j):
                    with open(p, "wb") as f:
                        np.savez(f, image=res.images[j].numpy().astype(np.float32),
                                 label=res.labels[j].numpy().astype(np.uint8), mask=cond[j].astype(np.uint8))

                _write_atomic(name + ".npz", save_npz)
                report = dict(res.reports[j], index=int(i), batch=[int(k) for k in idx])
                _write_json(name + ".json", report)
    finally:
        bar.close()
    write_summary(output_folder)
    return list(range(num_volumes))


def write_summary(folder: str) -> dict:
    """Aggregate the per-volume reports of a set into ``summary.json`` and return it."""
    import json
    import os

    reports = []
    for i in existing_volumes(folder):
        with open(os.path.join(folder, volume_name(i) + ".json")) as f:
            reports.append(json.load(f))

    def agg(key):
        v = [r[key] for r in reports if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} if v else None

    summary = {"num_volumes": len(reports), "mean_dice": agg("mean_dice"), "stats_distance": agg("stats_distance"),
               "stats_distance_start": agg("stats_distance_start"),
               "per_volume": {volume_name(r["index"]): {"mean_dice": r["mean_dice"],
                                                        "stats_distance": r["stats_distance"]} for r in reports}}
    _write_json(os.path.join(folder, SYNTHESIS_SUMMARY), summary)
    return summary


def read_manifest(folder: str) -> Optional[dict]:
    """The ``synthesis.json`` of a set, or None when there is none."""
    import json
    import os

    path = os.path.join(folder, SYNTHESIS_MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_synthetic_set(folder: str, indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read the volumes of a set: ``(images (N, C_in, *patch) float32, labels (N, *patch) uint8)``."""
    import os

    idx = existing_volumes(folder) if indices is None else list(indices)
    if not idx:
        raise ValueError(f"{folder} holds no synthetic volume")
    images, labels = [], []
    for i in idx:
        with np.load(os.path.join(folder, volume_name(i) + ".npz")) as d:
            images.append(d["image"])
            labels.append(d["label"])
    return np.stack(images), np.stack(labels)

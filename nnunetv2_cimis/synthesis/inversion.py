"""Mask-conditioned DeepInversion: the image optimisation of MOSInversion.

MOSInversion (Kim, Lee, Shin, Kim, Park, "MOSInversion: Knowledge distillation-based incremental learning in
organ segmentation using DeepInversion", Computers in Biology and Medicine, 2025) replays old classes without
stored images: a synthetic volume ``x`` (the only optimised tensor, Gaussian start) is optimised with Adam so
that the frozen previous-step network (the *teacher*)

* segments ``x`` as a given conditioning mask (a real label patch of an earlier step, varied by
  :class:`~nnunetv2_cimis.synthesis.mask_augmentation.MaskAugmentation`): soft Dice of the teacher's softmax
  against the mask (the package's one soft Dice, :func:`nnunetv2_cimis.losses.dice.soft_dice_loss`, as batch
  Dice over the classes present in the mask);
* sees, at every normalisation layer, inputs whose per-channel mean and variance match the statistics
  recorded over the earlier step's training data (:class:`~nnunetv2_cimis.synthesis.priors.FeatureStatisticsLoss`);
* is smooth (:class:`~nnunetv2_cimis.synthesis.priors.TotalVariationPrior`).

The teacher's argmax on the final ``x`` becomes the synthetic volume's label. nnU-Net's networks use
InstanceNorm, which keeps no running statistics; the target statistics therefore come from the step memory
(``StepMemory.norm_stats``), recorded with the same recorder and layer names
(:mod:`nnunetv2_cimis.networks.norm_statistics`).

Defaults: Adam lr 0.1, 2000 iterations, Dice weight 1, statistics weight 1 with the first layer x10, TV L1
2.5e-5, TV L2 3e-8. The learning-rate schedule is a choice: the default ``"poly"`` decays it as
``lr * (1 - i/n)^0.9``; the first author's mask-conditioned generator keeps it constant
(``lr_schedule="constant"``).

With ``stats_weight = 0`` nothing keeps the volumes in the intensity range of nnU-Net's normalised data: the
network normalises every convolution's output per image and channel (InstanceNorm), so the teacher's
segmentation barely changes when the input is scaled and the Dice term alone lets the intensities drift;
:func:`~nnunetv2_cimis.synthesis.synthetic_sets.synthesize_set` warns (:func:`stats_weight_warning`).

Synthetic sets on disk: :mod:`nnunetv2_cimis.synthesis.synthetic_sets`. Plain PyTorch; no nnU-Net import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from nnunetv2_cimis.losses.dice import soft_dice_loss
from nnunetv2_cimis.networks.norm_statistics import NormInputRecorder
from nnunetv2_cimis.synthesis.priors import FeatureStatisticsLoss, TotalVariationPrior

__all__ = ["InversionConfig", "InversionResult", "invert", "hard_dice_per_class", "mask_dice_loss",
           "stats_weight_warning"]


def mask_dice_loss(probabilities: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """The Dice term of the inversion: ``1 -`` mean soft Dice of ``probabilities`` ``(B, K, ...)`` against the
    integer ``mask`` ``(B, ...)``, per class over the whole batch (nnU-Net's "batch Dice"), averaged over the
    classes that occur in ``mask`` (background included); absent classes are pushed down by the softmax through
    the present ones. :func:`nnunetv2_cimis.losses.dice.soft_dice_loss` with ``batch_dice=True,
    present_classes_only=True``, shifted to ``1 - Dice``."""
    return 1 + soft_dice_loss(probabilities, mask, smooth=smooth, batch_dice=True, present_classes_only=True)


def stats_weight_warning(stats_weight: float) -> Optional[str]:
    """The warning for ``stats_weight == 0`` (None otherwise): without the feature-statistics term nothing keeps
    the synthetic volumes in nnU-Net's normalised intensity range."""
    if stats_weight > 0:
        return None
    return ("stats_weight is 0: the feature-statistics term is off, and nothing then keeps the synthetic volumes in "
            "the intensity range of nnU-Net's normalised data (the network normalises every convolution's output "
            "per image and channel, so scaling the input barely changes the teacher's segmentation and the Dice "
            "term does not hold the scale); the student would be trained on volumes unlike real data. Use "
            "stats_weight > 0 (default 1).")


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


@dataclass
class InversionConfig:
    """Settings of :func:`invert` (defaults: MOSInversion's).

    Attributes:
        iterations: Adam steps (default 2000).
        lr: Adam learning rate (0.1).
        lr_schedule: ``"poly"`` (lr * (1 - i/n)^0.9; a choice of this package) or ``"constant"`` (what the first
            author's mask-conditioned generator does).
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
    checked: List[bool] = []
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
        if not checked:  # the mask values, once per call (reading them waits for the device)
            lo, hi = int(masks.min()), int(masks.max())
            if lo < 0 or hi >= logits.shape[1]:
                raise ValueError(f"mask values must be in [0, {logits.shape[1]}), got [{lo}, {hi}]")
            checked.append(True)
        probs = torch.softmax(logits.float(), dim=1)
        loss = cfg.dice_weight * mask_dice_loss(probs, masks)
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

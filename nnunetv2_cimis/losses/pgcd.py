"""Prototype-Guided Calibration Distillation (PGCD), from Zhu et al., "Prototype-guided calibration
distillation and dual-aligned prototype distillation for class-incremental medical image segmentation"
(arXiv 2511.07749).

Plain voxel-wise distillation trusts the old model (the teacher) equally everywhere. PGCD calibrates the
strength of the distillation per old class and per voxel with the similarity between the teacher's feature
at that voxel and the class's global prototype (the mean feature of the class, stored when the class was
learned): where the teacher's feature looks like class ``c``, the class-``c`` term of the distillation is
strengthened; where it does not, that term is damped.

For old channel ``c`` (background = 0, then the old classes, ``n_old`` channels in all) and voxel ``i``:

* ``s_c(i) = cos(F_teacher(i), P_c)`` on the feature map of the prototype tap;
* ``w_c(i)`` from ``s`` (the paper does not publish the mapping; these are choices):

  - ``"softmax"`` (default): ``w_c = K * softmax_c(s_c / temperature)`` over the K classes that have a
    prototype, so that equal similarities give weight 1 everywhere;
  - ``"sigmoid"``: ``w_c = 2 * sigmoid((s_c - mean_k s_k) / temperature)``, each class on its own, centred on
    the voxel's mean similarity;
  - ``"uniform"``: ``w_c = 1`` (plain unbiased distillation, the ablation without calibration);

  classes without a global prototype get weight 1;
* ``q`` = the teacher's softmax, ``p`` = the student's probabilities over the teacher's channels with the new
  classes merged into background (MiB, ``merge_new_into_background``); the loss weights one term per class:

  - ``divergence="binary"`` (default): a per-class binary KL (class c vs. not c)::

        L = mean_{b, i} (1 / n_old) sum_c w_c(i) [q_c log(q_c / p_c) + (1 - q_c) log((1 - q_c) / (1 - p_c))]

    Every term is >= 0 and zero at ``p_c = q_c``, so the weights change *how strongly* each class is
    distilled at each voxel, never *towards what*: the minimum stays at the teacher (``p = q``);
  - ``divergence="categorical"``: the class terms of the categorical KL::

        L = mean_{b, i} (1 / n_old) sum_c w_c(i) q_c (log q_c - log p_c)

    With uniform weights it is MiB's unbiased distillation (KL form; same gradient as MiB's cross-entropy
    form). With other weights it is minimal at ``p_c = w_c q_c / sum_k w_k q_k``: the student is pulled to a
    re-weighted teacher (the target moves), and the value may be negative.

Both forms are this package's reading of "class-specific distillation intensity"; the phantom sweep in
``docs/methods_pgcd_dapd.md`` compares them.

The optional channel-weighted feature term of the paper is :class:`PrototypeChannelFeatureDistillation`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_cimis.losses.common import check_logits, check_student_teacher, merge_new_into_background

WEIGHTINGS = ("softmax", "sigmoid", "uniform")
DIVERGENCES = ("binary", "categorical")


def _check_prototypes(prototypes: torch.Tensor, valid: Optional[torch.Tensor], n: Optional[int], c: int):
    if prototypes.ndim != 2:
        raise ValueError(f"prototypes must be (K, C), got shape {tuple(prototypes.shape)}")
    if n is not None and prototypes.shape[0] != n:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} must have one row per old channel "
                         f"(background included): expected {n} rows")
    if prototypes.shape[1] != c:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} have {prototypes.shape[1]} channels but the features "
                         f"have {c}: the prototypes must come from the same feature tap")
    if valid is not None and valid.shape != prototypes.shape[:1]:
        raise ValueError(f"prototype_valid must be ({prototypes.shape[0]},), got {tuple(valid.shape)}")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize (each feature voxel's weight covers the logits voxels it sits on)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


class PrototypeGuidedCalibrationDistillation(nn.Module):
    """PGCD: class- and voxel-wise calibrated, background-aware distillation (see the module docstring).

    Args:
        weighting: ``"softmax"`` (default), ``"sigmoid"`` or ``"uniform"``; how similarities become weights.
        temperature: temperature of the softmax / sigmoid over cosine similarities (default 0.5; a choice,
            not the paper's number).
        divergence: ``"binary"`` (default) or ``"categorical"``: which per-class terms the weights scale
            (see the module docstring).
        eps: numerical floor of feature / prototype norms (default 1e-8).

    Inputs of :meth:`forward`:
        student_logits: ``(B, C_total, X, Y[, Z])``, channels ``[bg, old..., new...]``.
        teacher_logits: ``(B, n_old, X, Y[, Z])``, ``n_old <= C_total``, same batch and spatial size.
        weights: ``(B, n_old, x, y[, z])`` from :meth:`calibration_weights`, at any spatial size (resized
            to the logits' size by nearest neighbour) or ``None`` for uniform weights.

    Raises:
        ValueError: unknown weighting, temperature <= 0, bad shapes (the message shows them).
    """

    def __init__(self, weighting: str = "softmax", temperature: float = 0.5, divergence: str = "binary",
                 eps: float = 1e-8):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weighting = weighting
        self.temperature = float(temperature)
        self.eps = float(eps)

    @torch.no_grad()
    def calibration_weights(self, teacher_features: torch.Tensor, prototypes: torch.Tensor,
                            prototype_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-class, per-voxel distillation weights ``w`` ``(B, K, x, y[, z])`` (no gradient).

        Args:
            teacher_features: ``(B, C, x, y[, z])`` the teacher's features at the prototype tap.
            prototypes: ``(K, C)`` global prototypes of the old channels (row 0 = background).
            prototype_valid: ``(K,)`` bool, which rows hold a prototype; ``None`` = all. Invalid rows get
                weight 1.
        """
        check_logits("teacher_features", teacher_features)
        _check_prototypes(prototypes, prototype_valid, None, teacher_features.shape[1])
        k = prototypes.shape[0]
        shape = (teacher_features.shape[0], k) + tuple(teacher_features.shape[2:])
        if self.weighting == "uniform":
            return teacher_features.new_ones(shape, dtype=torch.float32)
        valid = (torch.ones(k, dtype=torch.bool, device=prototypes.device) if prototype_valid is None
                 else prototype_valid.to(prototypes.device).bool())
        weights = teacher_features.new_ones(shape, dtype=torch.float32)
        if not bool(valid.any()):
            return weights
        with torch.autocast(device_type=teacher_features.device.type, enabled=False):
            f = F.normalize(teacher_features.float(), dim=1, eps=self.eps)
            p = F.normalize(prototypes[valid].float().to(f.device), dim=1, eps=self.eps)
            sim = torch.einsum("kc,bc...->bk...", p, f)  # B, K_valid, ...
            if self.weighting == "softmax":
                w = torch.softmax(sim / self.temperature, dim=1) * sim.shape[1]
            else:
                w = 2.0 * torch.sigmoid((sim - sim.mean(dim=1, keepdim=True)) / self.temperature)
        weights[:, valid.to(weights.device)] = w
        return weights

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_student_teacher(student_logits, teacher_logits)
        n_old = teacher_logits.shape[1]
        if n_old > student_logits.shape[1]:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} has more channels than student_logits "
                             f"{tuple(student_logits.shape)}: the student must keep every old channel first")
        if weights is not None:
            if weights.ndim != teacher_logits.ndim or weights.shape[:2] != teacher_logits.shape[:2]:
                raise ValueError(f"weights {tuple(weights.shape)} must be (B, n_old, ...) = "
                                 f"{tuple(teacher_logits.shape[:2])} + spatial; compute them with calibration_weights")
            weights = _resize(weights.detach().float(), student_logits.shape[2:])
        log_p = merge_new_into_background(student_logits.float(), n_old)
        if self.divergence == "categorical":
            with torch.no_grad():  # the teacher's side is constant: no graph for it
                log_q = torch.log_softmax(teacher_logits.float(), dim=1)
                weighted_q = log_q.exp()
                if weights is not None:
                    weighted_q = weighted_q * weights
                teacher_term = (weighted_q * log_q).sum(dim=1)  # B, ...
            return (teacher_term - (weighted_q * log_p).sum(dim=1)).mean() / n_old
        with torch.no_grad():
            q = torch.softmax(teacher_logits.float(), dim=1)
            teacher_term = torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q)
        # log(1 - p) = log(-expm1(log p)), accurate for p close to 1; log p is clamped just below 0 (no -inf)
        log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
        kl = teacher_term - q * log_p - (1 - q) * log_not_p  # B, n_old, ...
        if weights is not None:
            kl = kl * weights.detach()
        return kl.sum(dim=1).mean() / n_old


class PrototypeChannelFeatureDistillation(nn.Module):
    """The optional channel-weighted feature term of PGCD: squared feature difference, channels weighted by
    how strongly the old classes' global prototypes use them.

    ``a_ch = mean_c |P_c,ch|`` over the valid prototypes, normalised to mean 1 over channels (all ones when
    no prototype is valid or all are zero); ``L = mean_{b, i} (1 / C) sum_ch a_ch (F_s - F_t)^2``. The
    channel weighting is this package's choice: the paper states only that channel weights come from the
    prototypes.

    Inputs of :meth:`forward`:
        student_features, teacher_features: ``(B, C, X, Y[, Z])``, same shape.
        prototypes: ``(K, C)``; prototype_valid: ``(K,)`` bool or ``None``.

    Raises:
        ValueError: shapes differ or the prototypes do not have C channels.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def channel_weights(self, prototypes: torch.Tensor, prototype_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(C,)`` channel weights of mean 1 (see the class docstring)."""
        if prototypes.ndim != 2:
            raise ValueError(f"prototypes must be (K, C), got shape {tuple(prototypes.shape)}")
        p = prototypes.detach().float()
        if prototype_valid is not None:
            p = p[prototype_valid.to(p.device).bool()]
        if p.shape[0] == 0:
            return torch.ones(prototypes.shape[1], device=prototypes.device)
        a = p.abs().mean(dim=0)
        if float(a.mean()) <= self.eps:
            return torch.ones_like(a)
        return a / a.mean()

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, prototypes: torch.Tensor,
                prototype_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_logits("student_features", student_features)
        if student_features.shape != teacher_features.shape:
            raise ValueError(f"student_features {tuple(student_features.shape)} and teacher_features "
                             f"{tuple(teacher_features.shape)} must have the same shape (same feature tap)")
        _check_prototypes(prototypes, prototype_valid, None, student_features.shape[1])
        a = self.channel_weights(prototypes, prototype_valid).to(student_features.device)
        view = (1, -1) + (1,) * (student_features.ndim - 2)
        diff = student_features.float() - teacher_features.detach().float()
        return (diff.pow(2) * a.view(view)).mean()

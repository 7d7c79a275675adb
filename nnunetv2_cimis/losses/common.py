"""Small helpers shared by the incremental losses.

Conventions used by every loss in this package:

* logits and probabilities are ``(B, C, X, Y[, Z])``; 2D and 3D inputs are both accepted;
* label maps are ``(B, 1, X, Y[, Z])`` or ``(B, X, Y[, Z])`` integer tensors (nnU-Net gives the former,
  as float);
* "old channels" are the teacher's outputs: background (channel 0) and the classes learned before this
  step, which are channels ``1 .. n_old - 1`` of the student as well (the head is widened by appending
  the new classes after them).

Label values and host synchronisation. Checking that a label map holds only values in ``[0, K)`` needs its
minimum and maximum on the host: on a GPU every such check waits for the device (a synchronisation), and a
loss that checked every deep-supervision scale of every iteration stalled the training loop that often. The
losses therefore check label values in ``forward`` (:func:`check_label_range`) only where it costs no
synchronisation, on CPU tensors, or when ``nnUNet_cimis_debug_checks=1`` is set. The incremental trainer
checks every training batch once instead, on the host before the batch is moved to the device
(:func:`check_batch_labels`, called by ``nnUNetTrainerIncremental.train_step``). Shapes are always checked
(they are known on the host).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: environment variable: ``1`` makes the losses check label values in ``forward`` on every device
ENV_DEBUG_CHECKS = "nnUNet_cimis_debug_checks"


def debug_checks_enabled() -> bool:
    """True when ``nnUNet_cimis_debug_checks`` is set to ``1``/``true``/``yes``/``on``."""
    return os.environ.get(ENV_DEBUG_CHECKS, "").strip().lower() in ("1", "true", "yes", "on")


def label_checks_apply(labels: torch.Tensor) -> bool:
    """Whether a label-value check of ``labels`` runs: on CPU tensors (no device synchronisation) always,
    elsewhere only with ``nnUNet_cimis_debug_checks=1``."""
    return labels.device.type == "cpu" or debug_checks_enabled()


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None,
                      name: str = "target", mask: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` when ``labels`` hold a value outside ``[0, num_classes)`` (other than
    ``ignore_index``; voxels where ``mask`` is False are not looked at).

    Runs only where :func:`label_checks_apply` (CPU tensors, or ``nnUNet_cimis_debug_checks=1``): on a GPU the
    check would synchronise with the device; the trainer checks each batch once on the host instead.
    """
    if not label_checks_apply(labels) or labels.numel() == 0:
        return
    valid = None if mask is None else mask.bool()
    if ignore_index is not None:
        not_ignored = labels != ignore_index
        valid = not_ignored if valid is None else valid & not_ignored
    vals = labels if valid is None else labels[valid]
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= num_classes):
        raise ValueError(f"{name} holds label values in [{int(vals.min())}, {int(vals.max())}], outside the "
                         f"classes: labels must be in [0, {num_classes}) (0 .. {num_classes - 1})" +
                         ("" if ignore_index is None else f" or the ignore index {ignore_index}"))


def check_batch_labels(target, num_classes: int, ignore_index: Optional[int] = None) -> None:
    """Check the labels of one training batch once, before the losses see it (no device synchronisation).

    ``target`` is nnU-Net's batch target: a tensor ``(B, 1, ...)`` or a list over deep-supervision scales
    (the coarser scales are nearest-neighbour copies of the first, so only the first is read). On the CPU
    (where nnU-Net's data loader delivers it) the check costs no synchronisation; a target already on a GPU is
    checked only with ``nnUNet_cimis_debug_checks=1``.

    Raises:
        CIMISError: a value outside ``[0, num_classes)`` other than the ignore label, with how to fix it.
    """
    from nnunetv2_cimis.errors import CIMISError

    first = target[0] if isinstance(target, (list, tuple)) else target
    if not torch.is_tensor(first):
        return
    try:
        check_label_range(first, num_classes, ignore_index, name="the training batch's segmentation")
    except ValueError as e:
        raise CIMISError(f"{e}. The network has {num_classes} outputs; the step dataset's masks must use the "
                         f"label values of its dataset.json (recreate the step dataset with "
                         f"nnUNetv2_cimis_make_scenario or nnUNetv2_cimis_add_classes).") from None


def check_logits(name: str, x: torch.Tensor, min_channels: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` is a 4D or 5D ``(B, C, ...)`` tensor with at least ``min_channels``."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise ValueError(f"{name} must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    if x.shape[1] < min_channels:
        raise ValueError(f"{name} needs at least {min_channels} channels, got shape {tuple(x.shape)}")


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float; ``ValueError`` unless it is a (non-bool) number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """The shape checks of every distillation loss: both ``(B, C, ...)`` logits (:func:`check_logits`) with the
    same batch and spatial sizes (:func:`check_same_spatial`)."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_spatial("student_logits", student_logits, "teacher_logits", teacher_logits)


def check_same_spatial(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless batch and spatial sizes of ``a`` and ``b`` agree (channels may differ)."""
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same batch "
                         f"and spatial sizes")


def labels_to_index(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return a ``(B, X, Y[, Z])`` long label map from nnU-Net's ``(B, 1, ...)`` float or a ``(B, ...)`` map.

    ``like`` is a ``(B, C, ...)`` tensor whose batch and spatial sizes the labels must match.
    """
    if target.ndim == like.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target must have one channel, got shape {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape[0] != like.shape[0] or target.shape[1:] != like.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match the spatial size of "
                         f"{tuple(like.shape)}")
    return target.long()


def merge_new_into_background(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Log-probabilities of the student over the teacher's channels, new classes merged into background.

    The teacher's background may contain what is now a new class (MiB's unbiased distillation):
    ``log p(bg) = logsumexp(z[bg, new]) - logsumexp(z)`` and ``log p(c) = z_c - logsumexp(z)`` for old c.

    Args:
        logits: student logits ``(B, C_total, ...)``, channels ``[bg, old..., new...]``.
        n_old: number of teacher channels (background included), ``1 <= n_old <= C_total``.

    Returns:
        ``(B, n_old, ...)`` log-probabilities.
    """
    check_logits("logits", logits)
    if not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"n_old must be in [1, {logits.shape[1]}], got {n_old}")
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    bg = torch.logsumexp(torch.cat([logits[:, :1], logits[:, n_old:]], dim=1), dim=1, keepdim=True)
    return torch.cat([bg, logits[:, 1:n_old]], dim=1) - log_z


def merge_old_into_background(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Log-probabilities with background and old classes merged into channel 0 (MiB's unbiased CE).

    A voxel labelled 0 in step t may be background or any old class:
    ``log p(0) = logsumexp(z[bg, old]) - logsumexp(z)``; new classes keep ``z_c - logsumexp(z)``.

    Returns:
        ``(B, 1 + C_total - n_old, ...)``: channel 0 the merged one, then the new classes in order.
    """
    check_logits("logits", logits)
    if not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"n_old must be in [1, {logits.shape[1]}], got {n_old}")
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    merged = torch.logsumexp(logits[:, :n_old], dim=1, keepdim=True)
    return torch.cat([merged, logits[:, n_old:]], dim=1) - log_z


def resize_labels_nearest(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The package's one label resize: nearest neighbour with ``mode="nearest-exact"``, nnU-Net's rule for
    its deep-supervision targets (``DownsampleSegForDSTransform``), of a ``(B, X, Y[, Z])`` or ``(B, 1, ...)``
    label map to the spatial ``size``.

    ``nearest-exact`` takes, for output index ``i``, the input at ``floor((i + 0.5) * in / out)`` (the voxel
    whose centre is nearest); ``"nearest"`` would take ``floor(i * in / out)``, shifted by half a voxel.

    Returns a ``(B, *size)`` long tensor.
    """
    if labels.ndim == len(size) + 2:
        labels = labels[:, 0]
    if tuple(labels.shape[1:]) == tuple(size):
        return labels.long()
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return out[:, 0].long()


def resize_labels_like(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """:func:`resize_labels_nearest` of ``(B, 1, ...)`` labels to the spatial size of ``like`` ``(B', C, ...)``,
    returned as ``(B, 1, *size)`` in ``like``'s dtype (nnU-Net's target layout at that scale)."""
    return resize_labels_nearest(labels, like.shape[2:])[:, None].to(like.dtype)


def masked_mean(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6):
    """Mean feature over the voxels of each mask channel.

    Args:
        features: ``(B, C, ...)``.
        mask: ``(B, K, ...)`` non-negative weights (one-hot or soft), same batch and spatial sizes.

    Returns:
        ``(means, counts)``: ``(K, C)`` mean features (zero rows where a mask is empty, never NaN) and the
        ``(K,)`` summed weights. Use the sums ``means * counts`` for reductions across batches or ranks.
    """
    check_logits("features", features)
    check_same_spatial("features", features, "mask", mask)
    f = features.flatten(2)  # B, C, N
    m = mask.flatten(2).to(f.dtype)  # B, K, N
    sums = torch.einsum("bkn,bcn->kc", m, f)
    counts = m.sum(dim=(0, 2))
    means = sums / counts.clamp_min(eps)[:, None]
    return means, counts

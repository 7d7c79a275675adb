"""Class prototypes of a feature map: local (per batch) prototypes, their reduction across DDP ranks, and
the exponential-moving-average background prototype of PGCD / DAPD (Zhu et al., arXiv 2511.07749).

A *prototype* of a class is the mean feature vector over the voxels of that class. Here:

* :func:`class_masks` turns a label map into one mask channel per requested class;
* :func:`prototype_sums` gives the per-class feature sums and voxel counts of one batch (float32, autocast
  off, so that sums over hundreds of thousands of voxels cannot overflow in half precision);
* :func:`all_reduce_prototype_sums` sums them over the ranks of ``torch.distributed`` (``nnUNetv2_train
  -num_gpus N``) and is a no-op without an initialised process group. It is differentiable when the sums
  require grad: the backward pass all-reduces the gradient, so that with DDP's gradient averaging every rank
  gets exactly the gradient of the loss computed on the whole (all ranks) batch;
* :func:`local_prototypes` = the three above plus the division, never NaN (empty classes give zero rows
  and a zero count: callers decide with the count);
* :class:`EMAPrototype` is a prototype updated by exponential moving average (the dynamically updated
  background prototype), with a ``state_dict`` for checkpoints.

Layouts: features ``(B, C, X, Y[, Z])``; label maps ``(B, X, Y[, Z])`` or ``(B, 1, X, Y[, Z])`` integer (or
integer-valued float) tensors of the same batch and spatial size; prototypes ``(K, C)``; counts ``(K,)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from nnunetv2_cimis.losses.common import check_logits, check_same_spatial, masked_mean


def class_masks(labels: torch.Tensor, classes: Sequence[int], valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One mask channel per class: ``(B, K, ...)`` bool, channel k true where ``labels == classes[k]``.

    Args:
        labels: ``(B, X, Y[, Z])`` or ``(B, 1, X, Y[, Z])`` label map.
        classes: the K label values, in the order of the output channels.
        valid: optional ``(B, X, Y[, Z])`` bool mask of the voxels that may count at all (e.g. confident
            teacher predictions); ``None`` keeps every voxel.

    Raises:
        ValueError: ``classes`` is empty, or ``valid`` does not match the label map.
    """
    if len(classes) == 0:
        raise ValueError("classes must name at least one label value")
    if labels.ndim in (4, 5) and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (3, 4):
        raise ValueError(f"labels must be (B, X, Y[, Z]) or (B, 1, X, Y[, Z]), got shape {tuple(labels.shape)}")
    labels = labels.long()
    masks = torch.stack([labels == int(c) for c in classes], dim=1)
    if valid is not None:
        if valid.shape != labels.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must have the shape of the labels {tuple(labels.shape)}")
        masks = masks & valid[:, None].bool()
    return masks


IGNORE_REGION = -1


@torch.no_grad()
def old_class_regions(labels: torch.Tensor, teacher_logits: torch.Tensor, confidence: float = 0.0) -> torch.Tensor:
    """Where the old classes are in new data: the teacher's prediction on voxels labelled 0.

    Voxels labelled 0 in step t may be background or any old class. This map gives, for each voxel labelled
    0, the teacher's argmax (0 = background, ``1 .. n_old - 1`` = old classes), and ``IGNORE_REGION`` (-1)
    for voxels of new classes and for voxels where the teacher's top probability is below ``confidence``.

    Args:
        labels: ``(B, X, Y[, Z])`` or ``(B, 1, X, Y[, Z])`` step labels (0 = not a new class).
        teacher_logits: ``(B, n_old, X, Y[, Z])``, same batch and spatial size.
        confidence: minimum teacher probability of its argmax, in ``[0, 1]``; 0 keeps every voxel.

    Returns:
        ``(B, X, Y[, Z])`` long map.

    Raises:
        ValueError: bad shapes or confidence outside ``[0, 1]``.
    """
    check_logits("teacher_logits", teacher_logits)
    if not 0.0 <= float(confidence) <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {confidence}")
    if labels.ndim == teacher_logits.ndim:
        labels = labels[:, 0]
    if labels.shape[0] != teacher_logits.shape[0] or labels.shape[1:] != teacher_logits.shape[2:]:
        raise ValueError(f"labels {tuple(labels.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
                         f"the same batch and spatial sizes; resize the labels with resize_labels_nearest")
    probs = torch.softmax(teacher_logits.float(), dim=1)
    top, pred = probs.max(dim=1)
    keep = (labels.long() == 0)
    if confidence > 0:
        keep &= top >= confidence
    return torch.where(keep, pred, torch.full_like(pred, IGNORE_REGION))


def prototype_sums(features: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and voxel counts of one batch, in float32.

    Args:
        features: ``(B, C, X, Y[, Z])``; gradients flow through the sums.
        masks: ``(B, K, X, Y[, Z])`` bool or non-negative weights.

    Returns:
        ``(sums (K, C), counts (K,))``, both float32.

    Raises:
        ValueError: bad dimensions, or batch / spatial sizes of features and masks differ.
    """
    check_logits("features", features)
    check_same_spatial("features", features, "masks", masks)
    device_type = features.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        means, counts = masked_mean(features.float(), masks.float())
        sums = means * counts[:, None]
    return sums, counts


def _distributed_world_size() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_prototype_sums(sums: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum prototype sums and counts over every rank of the default process group.

    A no-op (the inputs are returned) when ``torch.distributed`` is unavailable, not initialised, or has one
    rank. Every rank must call it the same number of times in the same order (it is a collective). When
    ``sums`` requires grad, the reduction is ``torch.distributed.nn.functional.all_reduce``, whose backward
    all-reduces the gradient: since every rank then holds the same (global) loss, DDP's average of the
    ranks' gradients equals the gradient of that loss. Sums and counts travel in one message.

    Args:
        sums: ``(K, C)`` feature sums.
        counts: ``(K,)`` voxel counts (never requires grad).

    Returns:
        ``(sums, counts)`` summed over ranks.
    """
    if sums.ndim != 2 or counts.shape != sums.shape[:1]:
        raise ValueError(f"sums must be (K, C) and counts (K,), got {tuple(sums.shape)} and {tuple(counts.shape)}")
    if _distributed_world_size() == 1:
        return sums, counts
    import torch.distributed as dist
    packed = torch.cat([sums, counts.detach()[:, None].to(sums.dtype)], dim=1)
    if packed.requires_grad:
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
        packed = differentiable_all_reduce(packed, op=dist.ReduceOp.SUM)
    else:
        packed = packed.clone()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed[:, :-1], packed[:, -1].detach()


def prototypes_from_sums(sums: torch.Tensor, counts: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sums / counts`` row by row; rows with ``counts < eps`` (empty classes) are zero, never NaN."""
    return sums / counts.clamp_min(eps)[:, None] * (counts >= eps)[:, None].to(sums.dtype)


def local_prototypes(features: torch.Tensor, masks: torch.Tensor,
                     reduce_across_ranks: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each mask channel over the batch (and over DDP ranks).

    Args:
        features: ``(B, C, X, Y[, Z])``.
        masks: ``(B, K, X, Y[, Z])`` bool or non-negative weights.
        reduce_across_ranks: sum the statistics over ``torch.distributed`` ranks before dividing (default
            True; a no-op in a single process).

    Returns:
        ``(prototypes (K, C), counts (K,))``, float32; a class without voxels has a zero row and count 0.
    """
    sums, counts = prototype_sums(features, masks)
    if reduce_across_ranks:
        sums, counts = all_reduce_prototype_sums(sums, counts)
    return prototypes_from_sums(sums, counts), counts


class EMAPrototype:
    """A prototype updated by exponential moving average: ``p <- m * p + (1 - m) * batch_prototype``.

    The dynamically updated background prototype of DAPD / PGCD. The first update with a non-empty batch
    (or :meth:`initialize`) sets it; updates with an empty batch (count 0) leave it unchanged.

    Args:
        momentum: ``m`` in ``[0, 1)``; default 0.99 (a horizon of about 100 iterations).

    Raises:
        ValueError: momentum outside ``[0, 1)``.
    """

    def __init__(self, momentum: float = 0.99):
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.value: Optional[torch.Tensor] = None
        self.num_updates = 0

    @property
    def is_set(self) -> bool:
        return self.value is not None

    def initialize(self, prototype: torch.Tensor) -> None:
        """Set the prototype (e.g. from the step memory's background row) without counting an update."""
        if prototype.ndim != 1:
            raise ValueError(f"a prototype is a (C,) vector, got shape {tuple(prototype.shape)}")
        self.value = prototype.detach().float().clone()

    @torch.no_grad()
    def update(self, batch_prototype: torch.Tensor, count) -> None:
        """Move towards ``batch_prototype`` ``(C,)``; ignored when ``count`` (its voxel count) is 0."""
        if float(count) <= 0:
            return
        p = batch_prototype.detach().float()
        if p.ndim != 1:
            raise ValueError(f"a prototype is a (C,) vector, got shape {tuple(p.shape)}")
        if self.value is None:
            self.value = p.clone()
        else:
            if self.value.shape != p.shape:
                raise ValueError(f"batch prototype {tuple(p.shape)} does not match the stored "
                                 f"{tuple(self.value.shape)}")
            self.value = self.momentum * self.value.to(p.device) + (1.0 - self.momentum) * p
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "num_updates": self.num_updates,
                "value": None if self.value is None else self.value.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.num_updates = int(state["num_updates"])
        self.value = None if state["value"] is None else state["value"].float().clone()

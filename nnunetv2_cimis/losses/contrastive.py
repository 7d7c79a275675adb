"""Cross-image pixel contrast: projection head, class-wise memory queues and supervised InfoNCE.

Reference: W. Wang, T. Zhou, F. Yu, J. Dai, E. Konukoglu, L. Van Gool, "Exploring Cross-Image Pixel
Contrast for Semantic Segmentation", ICCV 2021. Used by the diffusion-driven distillation method of
X. Zhao et al., "Diffusion-driven distillation and contrastive learning for class-incremental semantic
segmentation of laparoscopic images", IJCARS 2025 (see docs/methods_ddcl.md).

What is taken from the ICCV 2021 paper, as it states it: a projection head maps decoder features to L2-normalised
pixel embeddings; class-wise memory queues keep pixel embeddings of earlier images, so an anchor is
contrasted with pixels of other images; the loss is the supervised InfoNCE of their Eq. 2 with
temperature 0.07,

    L_i = 1/|P_i| sum_{p in P_i} -log( exp(i.p / tau) / (exp(i.p / tau) + sum_{n in N_i} exp(i.n / tau)) ),

P_i the contrast pixels of the anchor's class (the anchor itself excluded), N_i those of other classes;
anchors are sampled per class, half "hard" (mis-predicted) and half "easy" when predictions are given.
What is a choice here [open]: the head's width and depth, the number of anchors and queue sizes, the
number of pixels pushed per image and class; they are arguments with defaults documented below.

Layouts: embeddings and features ``(B, D, X, Y[, Z])``; label maps ``(B, X, Y[, Z])`` or ``(B, 1, ...)``
integers where a negative value (or ``ignore_index``) means "no label, do not use".
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_cimis.losses.common import check_logits, labels_to_index


class ProjectionHead(nn.Module):
    """1x1 convolutions mapping features to L2-normalised embeddings (conv - ReLU - conv, then normalise).

    Args:
        in_channels: channels ``C`` of the features it reads.
        embedding_dim: output channels ``D`` (default 32, a choice; the ICCV 2021 paper uses 256 on
            natural-image backbones).
        hidden_channels: width of the hidden 1x1 convolution (default: ``in_channels``).
        spatial_dims: 2 or 3.

    Input ``(B, C, X, Y[, Z])``, output ``(B, D, X, Y[, Z])`` with unit L2 norm along ``D``.

    Raises:
        ValueError: non-positive sizes or ``spatial_dims`` not in (2, 3); in ``forward``, an input whose
            number of dimensions or channels does not match.
    """

    def __init__(self, in_channels: int, embedding_dim: int = 32, hidden_channels: Optional[int] = None,
                 spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        hidden_channels = in_channels if hidden_channels is None else hidden_channels
        for name, v in (("in_channels", in_channels), ("embedding_dim", embedding_dim),
                        ("hidden_channels", hidden_channels)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.net = nn.Sequential(conv(in_channels, hidden_channels, 1), nn.ReLU(inplace=True),
                                 conv(hidden_channels, embedding_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != self.spatial_dims + 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"ProjectionHead expects (B, {self.in_channels}, " +
                             ", ".join("XYZ"[:self.spatial_dims]) + f") features, got {tuple(features.shape)}; "
                             f"build the head with the tapped module's channel count and spatial_dims")
        return F.normalize(self.net(features), dim=1)


class ClassMemoryQueue(nn.Module):
    """First-in-first-out queues of embeddings, one per class, kept across iterations (and checkpoints).

    Args:
        num_classes: number of classes ``K`` (label values ``0 .. K-1``; background is class 0).
        dim: embedding size ``D``.
        size: capacity of each class's queue (default 500, a choice).

    The state (``queue`` ``(K, size, D)``, write pointers ``ptr`` ``(K,)``, fill counts ``count`` ``(K,)``)
    lives in buffers, so ``state_dict()`` / ``load_state_dict()`` save and restore it exactly.

    Raises:
        ValueError: non-positive sizes; in :meth:`push`, mismatching shapes or labels outside ``0..K-1``.
    """

    def __init__(self, num_classes: int, dim: int, size: int = 500):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("dim", dim), ("size", size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.num_classes, self.dim, self.size = num_classes, dim, size
        self.register_buffer("queue", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``embeddings`` ``(M, D)`` with class ``labels`` ``(M,)``; the oldest entries are overwritten.

        If more than ``size`` embeddings of one class arrive at once, the last ``size`` are kept.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (M, {self.dim}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be (M,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got values "
                             f"{sorted(set(labels.tolist()))}; drop ignored pixels before pushing")
        embeddings = embeddings.detach().to(self.queue)
        for k in torch.unique(labels).tolist():
            e = embeddings[labels == k][-self.size:]
            n = e.shape[0]
            idx = (self.ptr[k] + torch.arange(n, device=self.queue.device)) % self.size
            self.queue[k, idx] = e
            self.ptr[k] = (self.ptr[k] + n) % self.size
            self.count[k] = min(int(self.count[k]) + n, self.size)

    def get(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All stored embeddings ``(N, D)`` and their labels ``(N,)`` (only filled slots)."""
        embs, labs = [], []
        for k in range(self.num_classes):
            c = int(self.count[k])
            if c:
                embs.append(self.queue[k, :c])
                labs.append(torch.full((c,), k, dtype=torch.long, device=self.queue.device))
        if not embs:
            return self.queue.new_zeros(0, self.dim), torch.zeros(0, dtype=torch.long, device=self.queue.device)
        return torch.cat(embs), torch.cat(labs)


def _flatten(embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, D, ...)`` and ``(B, ...)`` -> ``(N, D)`` and ``(N,)``."""
    d = embeddings.shape[1]
    return embeddings.movedim(1, -1).reshape(-1, d), labels.reshape(-1)


def sample_pixels_per_class(labels: torch.Tensor, max_per_class: int, hard: Optional[torch.Tensor] = None,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of at most ``max_per_class`` pixels of each label value ``>= 0`` in a flat ``(N,)`` label vector.

    With ``hard`` (a ``(N,)`` bool vector, True = mis-predicted), half of each class's quota is taken from
    the hard pixels and the rest from the easy ones (the other group fills in when one is short), as in
    the ICCV 2021 paper. All pixels of a class are taken when it has at most ``max_per_class``.
    """
    chosen = []
    for k in torch.unique(labels).tolist():
        if k < 0:
            continue
        idx = torch.nonzero(labels == k, as_tuple=False)[:, 0]
        if idx.numel() <= max_per_class:
            chosen.append(idx)
            continue
        if hard is None:
            perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_per_class]
            chosen.append(idx[perm.to(idx.device)])
            continue
        h, e = idx[hard[idx]], idx[~hard[idx]]
        n_h = min(h.numel(), max(max_per_class // 2, max_per_class - e.numel()))
        n_e = max_per_class - n_h
        ph = torch.randperm(h.numel(), generator=generator, device="cpu")[:n_h].to(idx.device)
        pe = torch.randperm(e.numel(), generator=generator, device="cpu")[:n_e].to(idx.device)
        chosen.append(torch.cat([h[ph], e[pe]]))
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat(chosen)


class CrossImagePixelContrastLoss(nn.Module):
    """Supervised pixel InfoNCE against in-batch pixels and class-wise memory queues (Wang et al. ICCV 2021).

    Args:
        temperature: ``tau`` (default 0.07, the paper's value).
        max_anchors_per_class: anchors sampled per class and batch (default 64, a choice).
        queue_pixels_per_image: pixels per class and image pushed into the queue by
            :meth:`update_queue` (default 10, a choice).
        ignore_index: label value never used, besides every negative value (default -1).

    ``forward(embeddings, labels, queue=None, predictions=None)``:
        embeddings: ``(B, D, X, Y[, Z])``; L2-normalised here along ``D`` (a no-op for
            :class:`ProjectionHead` outputs).
        labels: ``(B, X, Y[, Z])`` or ``(B, 1, X, Y[, Z])`` integer class of each pixel; negative values
            and ``ignore_index`` are ignored.
        queue: optional :class:`ClassMemoryQueue`; its entries join the contrast set (no gradient).
        predictions: optional ``(B, X, Y[, Z])`` predicted classes, for hard/easy anchor sampling.

    Returns the mean of ``L_i`` over anchors that have at least one positive; ``0`` (still attached to
    the graph) when no anchor has one. Contrast set = the sampled anchors themselves plus the queue.

    Raises:
        ValueError: ``temperature <= 0`` or ``max_anchors_per_class < 1`` in the constructor; embeddings
            that are not ``(B, D, X, Y[, Z])``, labels or predictions whose batch/spatial sizes differ, a
            queue whose ``dim`` differs from ``D``, in ``forward``.
    """

    def __init__(self, temperature: float = 0.07, max_anchors_per_class: int = 64,
                 queue_pixels_per_image: int = 10, ignore_index: int = -1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(max_anchors_per_class, int) or max_anchors_per_class < 1:
            raise ValueError(f"max_anchors_per_class must be a positive integer, got {max_anchors_per_class!r}")
        if not isinstance(queue_pixels_per_image, int) or queue_pixels_per_image < 1:
            raise ValueError(f"queue_pixels_per_image must be a positive integer, got {queue_pixels_per_image!r}")
        self.temperature = float(temperature)
        self.max_anchors_per_class = max_anchors_per_class
        self.queue_pixels_per_image = queue_pixels_per_image
        self.ignore_index = ignore_index

    def _clean_labels(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        labels = labels_to_index(labels, embeddings).clone()
        labels[labels == self.ignore_index] = -1
        labels[labels < 0] = -1
        return labels

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, queue: Optional[ClassMemoryQueue] = None,
                predictions: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_logits("embeddings", embeddings)
        labels = self._clean_labels(labels, embeddings)
        if queue is not None and queue.dim != embeddings.shape[1]:
            raise ValueError(f"the queue holds {queue.dim}-d embeddings but embeddings have D = "
                             f"{embeddings.shape[1]} (shape {tuple(embeddings.shape)})")
        emb, lab = _flatten(F.normalize(embeddings, dim=1), labels)
        hard = None
        if predictions is not None:
            pred = labels_to_index(predictions, embeddings)
            hard = (pred.reshape(-1) != lab)
        idx = sample_pixels_per_class(lab, self.max_anchors_per_class, hard, generator)
        anchors, a_lab = emb[idx], lab[idx]
        contrast, c_lab = anchors, a_lab
        if queue is not None:
            q_emb, q_lab = queue.get()
            contrast = torch.cat([anchors, q_emb.to(anchors).detach()])
            c_lab = torch.cat([a_lab, q_lab.to(a_lab.device)])
        zero = embeddings.sum() * 0.0
        if anchors.shape[0] == 0:
            return zero
        sim = anchors @ contrast.t() / self.temperature  # (A, N)
        same = a_lab[:, None] == c_lab[None, :]
        self_mask = torch.zeros_like(same)
        self_mask[:, :anchors.shape[0]] = torch.eye(anchors.shape[0], dtype=torch.bool, device=same.device)
        pos = same & ~self_mask
        neg = ~same
        # log sum_{n in N_i} exp(s_in); a large negative constant stands for "no negative" (exp -> 0)
        neg_lse = torch.logsumexp(sim.masked_fill(~neg, -1e4), dim=1, keepdim=True)
        log_prob = sim - torch.logaddexp(sim, neg_lse)  # log( e^{s_ip} / (e^{s_ip} + sum_n e^{s_in}) )
        n_pos = pos.sum(1)
        valid = n_pos > 0
        if not bool(valid.any()):
            return zero
        per_anchor = -(log_prob * pos).sum(1)[valid] / n_pos[valid]
        return per_anchor.mean()

    @torch.no_grad()
    def update_queue(self, queue: ClassMemoryQueue, embeddings: torch.Tensor, labels: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> None:
        """Push up to ``queue_pixels_per_image`` random pixels of each class of each image into ``queue``.

        ``embeddings`` ``(B, D, ...)`` (normalised here), ``labels`` as in ``forward``; ignored pixels and
        labels ``>= queue.num_classes`` are skipped.
        """
        check_logits("embeddings", embeddings)
        labels = self._clean_labels(labels, embeddings)
        labels[labels >= queue.num_classes] = -1
        emb = F.normalize(embeddings.detach(), dim=1)
        for b in range(emb.shape[0]):
            e, lab = _flatten(emb[b:b + 1], labels[b:b + 1])
            idx = sample_pixels_per_class(lab, self.queue_pixels_per_image, None, generator)
            if idx.numel():
                queue.push(e[idx], lab[idx])


def labels_for_contrast(labels: torch.Tensor, teacher_logits: torch.Tensor, confidence: float = 0.0,
                        background_known: Union[bool, torch.Tensor] = True, ignore_index: int = -1) -> torch.Tensor:
    """Pixel classes for the contrast at a step t > 0: ground truth, plus the teacher's old-class pseudo-labels.

    Args:
        labels: ``(B, X, Y[, Z])`` or ``(B, 1, ...)`` step labels (new classes; 0 = background or old class).
        teacher_logits: ``(B, n_old, X, Y[, Z])`` teacher logits over background and old classes.
        confidence: a pixel labelled 0 gets the teacher's old class ``c >= 1`` when its softmax
            probability is at least this; an old-class prediction below it is ignored (default 0: always).
        background_known: per sample (bool or ``(B,)`` bool tensor): whether a pixel that is 0 in
            ``labels`` and background for the teacher may be used as background. False for synthetic
            images, which have no ground truth: there such pixels could belong to a new class.
        ignore_index: value written for unusable pixels (default -1).

    Returns:
        ``(B, X, Y[, Z])`` long labels.
    """
    check_logits("teacher_logits", teacher_logits)
    lab = labels_to_index(labels, teacher_logits)
    prob = torch.softmax(teacher_logits.float(), dim=1)
    p_max, t_cls = prob.max(dim=1)
    out = lab.clone()
    unlabeled = lab == 0
    old_ok = unlabeled & (t_cls > 0) & (p_max >= confidence)
    out[old_ok] = t_cls[old_ok]
    out[unlabeled & (t_cls > 0) & (p_max < confidence)] = ignore_index
    known = torch.as_tensor(background_known, dtype=torch.bool, device=lab.device)
    if known.ndim == 0:
        known = known.expand(lab.shape[0])
    if known.shape != (lab.shape[0],):
        raise ValueError(f"background_known must be a bool or a ({lab.shape[0]},) tensor, got {tuple(known.shape)}")
    bg_unknown = unlabeled & (t_cls == 0) & ~known.view(-1, *([1] * (lab.ndim - 1)))
    out[bg_unknown] = ignore_index
    return out

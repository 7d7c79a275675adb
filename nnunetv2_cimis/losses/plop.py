"""PLOP: local POD distillation and entropy-based pseudo-labelling, for 2D and 3D segmentation.

Douillard, Chen, Dapogny, Cord, "PLOP: Learning without Forgetting for Continual Semantic Segmentation",
CVPR 2021.

* **Local POD** (:class:`LocalPOD`): features are squared, then, inside every region of a multi-scale grid
  (scales ``{1, 2, 4}``: 1, 2x2, 4x4 regions in 2D), averaged along all axes but one ("pooled per axis":
  in 2D a row profile and a column profile per region). The embeddings of student and teacher are compared
  with the Frobenius (L2) norm per image, averaged over the batch. In 3D a region has three profiles (one
  per axis). Anisotropic patches: the number of regions along each axis follows the physical extent of the
  patch (``extent``): a scale ``s`` gives ``s`` regions along the longest axis and proportionally fewer
  along shorter ones (never fewer than 1 nor more than the axis length); explicit per-axis counts may be
  given instead.
* **Distillation** (:class:`PLOPDistillationLoss`): local POD on several feature maps (weight 0.01) and on
  the logits (weight 0.0005, the student's new-class logits summed into its background logit), times
  ``sqrt(n_total / n_new)``, divided by the number of distilled maps (PLOP's code).
* **Pseudo-labels** (:class:`PLOPPseudoLabeller`): on voxels labelled 0 (background or old), the teacher's
  argmax is used as label where the teacher's normalised entropy is below a per-class threshold, the
  median entropy of that class over the step's training data (computed once at the start of the step,
  floor 0.001); uncertain voxels are ignored, and each image's cross-entropy is weighted by its fraction
  of confident background/old voxels (:class:`PseudoLabelDiceCELoss`).

Differences with PLOP's code, all deliberate and documented in docs/trainers_baselines.md: regions cover
every voxel when an axis is not divisible by the number of regions (PLOP drops the remainder); the
normalised entropy is ``H(q) / log(n_old)`` in ``[0, 1]`` (PLOP's code divides the per-class *mean* of
``-q log q`` by ``log(n_old)`` and again by ``log(n_total)``; thresholds are medians, so only the floor's
meaning changes); the histogram median is interpolated inside the median bin without the running-sum slip
of PLOP's ``find_median``; an image without any label-0 voxel gets weight 1 (PLOP's current code,
``num / (den + 1e-6)``, gives it weight 0; an early version divided 0 by 0).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cimis.losses.common import check_label_range, check_logits, labels_to_index
from nnunetv2_cimis.losses.deep_supervision import apply_over_scales
from nnunetv2_cimis.losses.dice import soft_dice_loss

__all__ = ["region_splits", "LocalPOD", "sum_new_logits_into_background", "PLOPDistillationLoss",
           "normalized_entropy", "PLOPPseudoLabeller", "PseudoLabelDiceCELoss"]

Scale = Union[int, Sequence[int]]
_AXES = "xyz"
_BLOCKS = "JKL"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def region_splits(spatial_shape: Sequence[int], scale: Scale,
                  extent: Optional[Sequence[float]] = None) -> Tuple[int, ...]:
    """Number of regions along each axis for one POD scale.

    Args:
        spatial_shape: sizes of the feature map's spatial axes (2 or 3 of them).
        scale: an int ``s`` (``s`` regions along the longest axis) or a tuple of per-axis counts.
        extent: physical extent of the input along each axis (e.g. patch size x spacing), or None: then an
            int scale splits every axis into ``s`` regions, as PLOP does on square 2D crops. With an extent,
            axis ``d`` gets ``round(s * extent_d / max(extent))`` regions.

    Every count is clipped to ``[1, size of the axis]``.

    Raises:
        ValueError: a scale < 1, a tuple or extent of the wrong length, a non-positive extent.
    """
    shape = tuple(int(s) for s in spatial_shape)
    nd = len(shape)
    if _is_int(scale):
        if scale < 1:
            raise ValueError(f"a POD scale must be >= 1, got {scale}")
        if extent is None:
            counts = [scale] * nd
        else:
            ext = [float(e) for e in extent]
            if len(ext) != nd:
                raise ValueError(f"extent {tuple(extent)} has {len(ext)} axes but the features have {nd} spatial "
                                 f"axes (shape {shape}); give one extent per spatial axis")
            if min(ext) <= 0:
                raise ValueError(f"extent must be positive on every axis, got {tuple(extent)}")
            longest = max(ext)
            counts = [int(math.floor(scale * e / longest + 0.5)) for e in ext]
    else:
        counts = list(scale)
        if len(counts) != nd or not all(_is_int(c) and c >= 1 for c in counts):
            raise ValueError(f"a per-axis POD scale must hold {nd} integers >= 1 (one per spatial axis of "
                             f"{shape}), got {tuple(scale)}")
    return tuple(max(1, min(c, n)) for c, n in zip(counts, shape))


def _averaging_matrix(size: int, n: int, device, dtype) -> torch.Tensor:
    """``(n, size)`` matrix averaging each of ``n`` contiguous blocks (sizes differ by at most 1)."""
    bounds = [(k * size) // n for k in range(n + 1)]
    a = torch.zeros(n, size, device=device, dtype=dtype)
    for j in range(n):
        a[j, bounds[j]:bounds[j + 1]] = 1.0 / (bounds[j + 1] - bounds[j])
    return a


def _axis_profiles(x: torch.Tensor, counts: Sequence[int]) -> List[torch.Tensor]:
    """For each spatial axis d: region-wise means over the other axes, ``(B, C, size_d, n_other...)``.

    The entries of the profile of axis d over all regions of the grid are exactly the "pooled along d"
    vectors of every region (each position along d falls in one region along d).
    """
    nd = x.ndim - 2
    mats = [_averaging_matrix(x.shape[2 + e], counts[e], x.device, x.dtype) for e in range(nd)]
    out = []
    for d in range(nd):
        others = [e for e in range(nd) if e != d]
        spec_x = "bc" + _AXES[:nd]
        spec_m = [_BLOCKS[e] + _AXES[e] for e in others]
        spec_out = "bc" + _AXES[d] + "".join(_BLOCKS[e] for e in others)
        out.append(torch.einsum(",".join([spec_x] + spec_m) + "->" + spec_out, x, *[mats[e] for e in others]))
    return out


class LocalPOD(nn.Module):
    """PLOP's local POD distance between two feature maps, 2D or 3D.

    Args:
        scales: POD scales; each an int (regions along the longest axis) or a tuple of per-axis region
            counts. Default ``(1, 2, 4)`` (PLOP).
        extent: physical extent of the network input per spatial axis (patch size x spacing) used to give
            anisotropic patches fewer regions along their short axes; None = same count on every axis.
        square: square the features first (PLOP's ``prepro="pow"``). Default True.

    Inputs of ``forward(student, teacher)``: two ``(B, C, X, Y[, Z])`` tensors of the same shape (the
    teacher is detached here).

    Returns:
        ``mean_b || E(student_b) - E(teacher_b) ||_2`` where ``E`` concatenates the per-axis region profiles
        of every scale. A scalar tensor >= 0.

    Raises:
        ValueError: empty or invalid scales, shapes that differ or are not 4D/5D.
    """

    def __init__(self, scales: Sequence[Scale] = (1, 2, 4), extent: Optional[Sequence[float]] = None,
                 square: bool = True):
        super().__init__()
        scales = list(scales)
        if not scales:
            raise ValueError("scales must hold at least one POD scale, e.g. (1, 2, 4)")
        for s in scales:
            if _is_int(s):
                if s < 1:
                    raise ValueError(f"POD scales must be >= 1, got {s}")
            elif not (isinstance(s, (list, tuple)) and len(s) in (2, 3) and all(_is_int(c) and c >= 1 for c in s)):
                raise ValueError(f"a POD scale is an int >= 1 or a tuple of 2 or 3 ints >= 1, got {s!r}")
        if extent is not None:
            extent = tuple(float(e) for e in extent)
            if len(extent) not in (2, 3) or min(extent) <= 0:
                raise ValueError(f"extent must hold 2 or 3 positive numbers, got {extent}")
        self.scales = [s if _is_int(s) else tuple(s) for s in scales]
        self.extent = extent
        self.square = bool(square)

    def embedding_parts(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The per-axis region profiles of ``x`` for every scale (a list of tensors starting with ``(B, C)``)."""
        if self.square:
            x = x * x
        parts = []
        for s in self.scales:
            counts = region_splits(x.shape[2:], s, self.extent)
            parts.extend(_axis_profiles(x, counts))
        return parts

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_logits("student", student)
        check_logits("teacher", teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
                             f"same shape (for logits, sum the student's new channels into background first)")
        a = self.embedding_parts(student.float())
        b = self.embedding_parts(teacher.detach().float())
        diff = torch.cat([(pa - pb).flatten(1) for pa, pb in zip(a, b)], dim=1)
        # vector_norm has a zero (sub)gradient at 0; sqrt(sum of squares) would give NaN gradients when the
        # student equals the teacher, which is exactly the case at the first iteration of a step
        return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()

    def extra_repr(self) -> str:
        return f"scales={self.scales}, extent={self.extent}, square={self.square}"


def sum_new_logits_into_background(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """PLOP's handling of extra channels for the logit POD: ``z'_0 = z_0 + sum_{k >= n_old} z_k``, old as is.

    Args:
        logits: ``(B, C_total, ...)``; n_old: teacher channels (background included), ``1 <= n_old <= C_total``.

    Returns:
        ``(B, n_old, ...)`` raw logits (not probabilities: PLOP sums the logits).
    """
    check_logits("logits", logits)
    if not _is_int(n_old) or not 1 <= n_old <= logits.shape[1]:
        raise ValueError(f"n_old must be an integer in [1, {logits.shape[1]}], got {n_old!r}")
    bg = logits[:, :1] + logits[:, n_old:].sum(dim=1, keepdim=True)
    return torch.cat([bg, logits[:, 1:n_old]], dim=1)


class PLOPDistillationLoss(nn.Module):
    """PLOP's POD loss over feature maps and (deep-supervision) logits.

    ``L = sqrt(n_total / n_new) * ( sum_l fw * POD(F_l) + lw * sum_s w_s POD(z_s) ) / (n_maps + 1)``
    where ``w_s`` are nnU-Net's deep-supervision weights over the logit scales, ``n_maps`` the number of
    feature maps (the ``+ 1`` counts the logits, as PLOP divides by the number of distilled maps).

    Args:
        n_old: teacher channels (background included). n_total: student channels. Requires
            ``1 <= n_old < n_total``.
        feature_weight: weight of each feature map's POD (PLOP: 0.01).
        logits_weight: weight of the logits' POD (PLOP: 0.0005); 0 disables the logit term.
        scales, extent: as :class:`LocalPOD`.
        class_schedule: multiply by ``sqrt(n_total / n_new)`` (PLOP's ``use_pod_schedule``; its
            ``nb_current_classes`` counts background). Default True.

    Inputs of ``forward(student_features, teacher_features, student_logits=None, teacher_logits=None,
    scale_weights=None)``:
        lists of ``(B, C_l, ...)`` feature maps (same shapes pairwise) and lists over deep-supervision
        scales of logits: student ``(B, n_total, ...)``, teacher ``(B, n_old, ...)``. ``scale_weights``: one
        weight per logit scale, nnU-Net's deep-supervision weights ``w_s`` (the trainer passes those of nnU-Net's
        ``DeepSupervisionWrapper``, the base trainer's ``deep_supervision_weights``); required with more than
        one scale (a single scale has weight 1).

    Raises:
        ValueError: bad arguments, list lengths that differ, several logit scales without ``scale_weights``,
            nothing to distil.
    """

    def __init__(self, n_old: int, n_total: int, feature_weight: float = 0.01, logits_weight: float = 0.0005,
                 scales: Sequence[Scale] = (1, 2, 4), extent: Optional[Sequence[float]] = None,
                 class_schedule: bool = True):
        super().__init__()
        if not (_is_int(n_old) and _is_int(n_total) and 1 <= n_old < n_total):
            raise ValueError(f"need integers 1 <= n_old < n_total, got n_old={n_old!r}, n_total={n_total!r}")
        for name, v in (("feature_weight", feature_weight), ("logits_weight", logits_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.n_old, self.n_total = n_old, n_total
        self.feature_weight = float(feature_weight)
        self.logits_weight = float(logits_weight)
        self.class_schedule = bool(class_schedule)
        self.pod = LocalPOD(scales, extent=extent)

    @property
    def schedule_factor(self) -> float:
        return math.sqrt(self.n_total / (self.n_total - self.n_old)) if self.class_schedule else 1.0

    def forward(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                student_logits: Optional[Sequence[torch.Tensor]] = None,
                teacher_logits: Optional[Sequence[torch.Tensor]] = None,
                scale_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        if len(student_features) != len(teacher_features):
            raise ValueError(f"{len(student_features)} student feature maps but {len(teacher_features)} teacher ones")
        if (student_logits is None) != (teacher_logits is None):
            raise ValueError("give both student_logits and teacher_logits, or neither")
        use_logits = student_logits is not None and self.logits_weight > 0
        n_maps = len(student_features) + (1 if use_logits else 0)
        if n_maps == 0:
            raise ValueError("nothing to distil: no feature maps and no logits")
        total = None
        for fs, ft in zip(student_features, teacher_features):
            term = self.feature_weight * self.pod(fs, ft)
            total = term if total is None else total + term
        if use_logits:
            if not isinstance(student_logits, (list, tuple)):
                student_logits, teacher_logits = [student_logits], [teacher_logits]
            if scale_weights is None:
                if len(student_logits) != 1:
                    raise ValueError(f"{len(student_logits)} logit scales: give scale_weights, nnU-Net's "
                                     f"deep-supervision weights (the trainer's deep_supervision_weights)")
                scale_weights = [1.0]

            def logit_pod(zs, zt):
                if zt.shape[1] != self.n_old or zs.shape[1] != self.n_total:
                    raise ValueError(f"logits must have n_total={self.n_total} (student) and n_old={self.n_old} "
                                     f"(teacher) channels, got {tuple(zs.shape)} and {tuple(zt.shape)}")
                return self.pod(sum_new_logits_into_background(zs, self.n_old), zt)

            term = self.logits_weight * apply_over_scales(logit_pod, list(scale_weights), list(student_logits),
                                                          list(teacher_logits))
            total = term if total is None else total + term
        return total * self.schedule_factor / n_maps


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(softmax(z)) / log(C)`` per voxel, in ``[0, 1]``; ``(B, C, ...)`` -> ``(B, ...)`` (zeros if C = 1)."""
    check_logits("logits", logits)
    c = logits.shape[1]
    if c == 1:
        return logits.new_zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.float32)
    log_q = torch.log_softmax(logits.float(), dim=1)
    h = -(log_q.exp() * log_q).sum(dim=1)
    return (h / math.log(c)).clamp(0.0, 1.0)


class PLOPPseudoLabeller(nn.Module):
    """Entropy-based pseudo-labels of old classes with per-class median thresholds (PLOP).

    Use: call :meth:`accumulate` on teacher outputs of the step's training batches, then
    :meth:`compute_thresholds` once (start of the step); then ``forward`` on every batch. The thresholds are
    a buffer: they are part of ``state_dict()`` and should be saved with the training checkpoint.

    Args:
        n_old: teacher channels, background included (>= 1).
        num_bins: histogram bins over ``[0, 1]`` for the median (PLOP: 100).
        threshold_floor: lower bound of every threshold (PLOP: 0.001).
        ignore_index: label written on uncertain voxels (PyTorch's default -100).
        min_image_weight: lower clamp of the per-image weight (PLOP's ``classif_adaptive_min_factor``, 0).

    ``forward(teacher_logits, target)``:
        teacher_logits ``(B, n_old, X, Y[, Z])``; target ``(B, 1, ...)`` or ``(B, ...)`` labels.
        Returns ``(pseudo_target, image_weights)``: ``(B, X, Y[, Z])`` long labels where every voxel
        labelled ``< n_old`` becomes the teacher's argmax if confident, else ``ignore_index`` (new-class
        labels kept), and ``(B,)`` weights = confident / all label-``< n_old`` voxels per image (1 if the
        image has none).

    Raises:
        ValueError: bad arguments or shapes; RuntimeError if ``forward`` runs before the thresholds exist.
    """

    def __init__(self, n_old: int, num_bins: int = 100, threshold_floor: float = 0.001, ignore_index: int = -100,
                 min_image_weight: float = 0.0):
        super().__init__()
        if not _is_int(n_old) or n_old < 1:
            raise ValueError(f"n_old must be an integer >= 1, got {n_old!r}")
        if not _is_int(num_bins) or num_bins < 1:
            raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
        if isinstance(threshold_floor, bool) or not isinstance(threshold_floor, (int, float)) \
                or not 0 <= threshold_floor <= 1:
            raise ValueError(f"threshold_floor must be in [0, 1], got {threshold_floor!r}")
        if not _is_int(ignore_index) or 0 <= ignore_index < n_old:
            raise ValueError(f"ignore_index must be an integer that is not a class, got {ignore_index!r}")
        if isinstance(min_image_weight, bool) or not isinstance(min_image_weight, (int, float)) \
                or not 0 <= min_image_weight <= 1:
            raise ValueError(f"min_image_weight must be in [0, 1], got {min_image_weight!r}")
        self.n_old = n_old
        self.num_bins = num_bins
        self.threshold_floor = float(threshold_floor)
        self.ignore_index = ignore_index
        self.min_image_weight = float(min_image_weight)
        self.register_buffer("histogram", torch.zeros(n_old, num_bins, dtype=torch.long))
        self.register_buffer("thresholds", torch.zeros(n_old, dtype=torch.float32))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @property
    def has_thresholds(self) -> bool:
        return bool(self.ready)

    def _check(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[1] != self.n_old:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must have n_old={self.n_old} channels")
        return labels_to_index(target, teacher_logits)

    @torch.no_grad()
    def accumulate(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add the normalised entropies of the voxels labelled ``< n_old`` to the per-class histograms."""
        labels = self._check(teacher_logits, target)
        mask = (labels >= 0) & (labels < self.n_old)
        ent = normalized_entropy(teacher_logits)[mask]
        cls = teacher_logits.argmax(dim=1)[mask]
        bins = (ent * self.num_bins).long().clamp(0, self.num_bins - 1)
        flat = (cls * self.num_bins + bins).to(self.histogram.device)
        self.histogram.view(-1).index_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def compute_thresholds(self) -> torch.Tensor:
        """Per-class median of the accumulated entropies (linear inside the median bin), floored.

        Classes never predicted get the floor. Returns the ``(n_old,)`` thresholds and marks them ready.
        """
        h = self.histogram.double()
        total = h.sum(dim=1)
        half = total / 2
        cums = h.cumsum(dim=1)
        k = (cums >= half[:, None]).double().argmax(dim=1)  # first bin reaching half
        before = torch.where(k > 0, cums.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(half))
        in_bin = h.gather(1, k[:, None])[:, 0]
        median = (k.double() + (half - before) / in_bin.clamp_min(1)) / self.num_bins
        median = torch.where(total > 0, median, torch.zeros_like(median))
        self.thresholds.copy_(median.clamp_min(self.threshold_floor).float())
        self.ready.fill_(True)
        return self.thresholds.clone()

    def reset(self) -> None:
        """Forget histograms and thresholds."""
        self.histogram.zero_()
        self.thresholds.zero_()
        self.ready.fill_(False)

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.has_thresholds:
            raise RuntimeError("PLOPPseudoLabeller: thresholds not computed; call accumulate(...) on the step's "
                               "training batches and compute_thresholds() first (or load them from a checkpoint)")
        labels = self._check(teacher_logits, target)
        pseudo = teacher_logits.argmax(dim=1)
        confident = normalized_entropy(teacher_logits) < self.thresholds.to(pseudo.device)[pseudo]
        bg_old = (labels >= 0) & (labels < self.n_old)
        out = labels.clone()
        out[bg_old & ~confident] = self.ignore_index
        keep = bg_old & confident
        out[keep] = pseudo[keep]
        num = keep.flatten(1).sum(1).float()
        den = bg_old.flatten(1).sum(1).float()
        weights = torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))
        return out, weights.clamp_min(self.min_image_weight)

    def extra_repr(self) -> str:
        return (f"n_old={self.n_old}, num_bins={self.num_bins}, threshold_floor={self.threshold_floor}, "
                f"ignore_index={self.ignore_index}")


class PseudoLabelDiceCELoss(nn.Module):
    """Cross-entropy weighted per image + soft Dice on a pseudo-labelled target (PLOP's classification loss
    in nnU-Net's Dice+CE form).

    CE: ``mean over all voxels of w_b * CE(i)`` with ``CE(i) = 0`` on ignored voxels (PLOP's code keeps the
    ignored voxels in the mean). Dice: nnU-Net's soft Dice over the non-ignored voxels, background left out
    by default as in nnU-Net; old classes are in it (they now have pseudo-labels).

    Args:
        weight_ce, weight_dice: term weights (nnU-Net: 1, 1).
        batch_dice, smooth: nnU-Net's Dice settings.
        include_background: Dice on channel 0 too (nnU-Net: False).
        ignore_index: the pseudo-labeller's ignore value.

    Inputs of ``forward(logits, pseudo_target, image_weights=None)``: logits ``(B, C, X, Y[, Z])``; labels
    ``(B, X, Y[, Z])`` or ``(B, 1, ...)``; weights ``(B,)`` (None = 1).

    Raises:
        ValueError: bad arguments, shapes or label values.
    """

    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = False,
                 smooth: float = 1e-5, include_background: bool = False, ignore_index: int = -100):
        super().__init__()
        for name, v in (("weight_ce", weight_ce), ("weight_dice", weight_dice), ("smooth", smooth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not _is_int(ignore_index):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.weight_ce, self.weight_dice = float(weight_ce), float(weight_dice)
        self.batch_dice, self.smooth = bool(batch_dice), float(smooth)
        self.include_background = bool(include_background)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, pseudo_target: torch.Tensor,
                image_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_logits("logits", logits)
        labels = labels_to_index(pseudo_target, logits)
        valid = labels != self.ignore_index
        check_label_range(labels, logits.shape[1], self.ignore_index, name="pseudo_target")
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_ce:
            ce = F.cross_entropy(logits.float(), safe, reduction="none") * valid.float()
            if image_weights is not None:
                if image_weights.shape != (logits.shape[0],):
                    raise ValueError(f"image_weights must be ({logits.shape[0]},), got {tuple(image_weights.shape)}")
                ce = ce * image_weights.to(ce.dtype).view(-1, *([1] * (ce.ndim - 1)))
            loss = loss + self.weight_ce * ce.mean()
        if self.weight_dice:
            probs = torch.softmax(logits.float(), dim=1)
            loss = loss + self.weight_dice * soft_dice_loss(probs, safe, valid, self.batch_dice, self.smooth,
                                                            self.include_background)
        return loss

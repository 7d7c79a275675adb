"""What a step keeps for later steps: the step memory.

Old images are never available at a later step, so whatever a later method needs from an earlier step
is computed when that step ends and saved next to its checkpoint as ``step_memory.pth``:

* per-class prototypes (mean decoder feature of each class, with voxel counts), used by PGCD / DAPD;
* per-channel mean and variance of the input of every normalisation layer, used by MOSInversion
  (nnU-Net's InstanceNorm keeps no running statistics);
* a bank of the step's preprocessed label patches, the masks MOSInversion conditions on.

Old-class prototypes are carried forward from the teacher's memory; see :func:`carry_forward`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.safe_load import load_weights_only

STEP_MEMORY_FILENAME = "step_memory.pth"
FORMAT_VERSION = 1


@dataclass
class StepMemory:
    """The saved memory of one trained step (see module docstring).

    Attributes:
        labels: global label value -> class name, background (0) included.
        prototype_tap: module path of the features the prototypes are taken from.
        prototypes: ``(L, C)`` float tensor, row ``v`` = prototype of label ``v``; ``L = max label + 1``.
        prototype_counts: ``(L,)`` number of voxels behind each row; 0 = no prototype for that label.
        norm_stats: normalisation module name -> ``{"mean": (C,), "var": (C,)}`` of that layer's input.
        label_bank: preprocessed label patches (uint8 arrays of the plans' patch size).
        patch_size: the plans' patch size.
        extra: method-specific content (e.g. a diffusion model's folder).
    """

    labels: Dict[int, str]
    prototype_tap: str
    prototypes: torch.Tensor
    prototype_counts: torch.Tensor
    norm_stats: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    label_bank: List[np.ndarray] = field(default_factory=list)
    patch_size: List[int] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = max(self.labels) + 1 if self.labels else 0
        if self.prototypes.ndim != 2 or self.prototypes.shape[0] != n:
            raise ValueError(f"prototypes must be (max label + 1 = {n}, C), got {tuple(self.prototypes.shape)}")
        if self.prototype_counts.shape != (n,):
            raise ValueError(f"prototype_counts must be ({n},), got {tuple(self.prototype_counts.shape)}")

    @property
    def num_labels(self) -> int:
        """Number of rows (max label + 1)."""
        return self.prototypes.shape[0]

    def has_prototype(self, label: int) -> bool:
        return 0 <= label < self.num_labels and float(self.prototype_counts[label]) > 0

    def save(self, path: str) -> None:
        """Write to ``path`` atomically (a temporary file renamed), so an interruption leaves no half file."""
        payload = {
            "format_version": FORMAT_VERSION,
            "labels": {int(k): str(v) for k, v in self.labels.items()},
            "prototype_tap": self.prototype_tap,
            "prototypes": self.prototypes.detach().cpu().float(),
            "prototype_counts": self.prototype_counts.detach().cpu().double(),
            "norm_stats": {k: {s: t.detach().cpu().float() for s, t in v.items()} for k, v in self.norm_stats.items()},
            "label_bank": [np.asarray(a, dtype=np.uint8) for a in self.label_bank],
            "patch_size": [int(i) for i in self.patch_size],
            "extra": self.extra,
        }
        tmp = path + ".tmp"
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> "StepMemory":
        """Read a step memory; a missing or unreadable file raises :class:`CIMISError` saying what to run."""
        if not os.path.isfile(path):
            raise CIMISError(
                f"No step memory at {path}. It is written when a step trained with an incremental trainer ends; "
                f"for a model trained by plain nnU-Net, compute it with `nnUNetv2_cimis_step_memory -m "
                f"{os.path.dirname(os.path.dirname(path))} -f <fold>` while its training data is still available.")
        try:
            d = load_weights_only(path, "step memory")
        except CIMISError as e:  # corrupt, or objects that only full unpickling loads
            raise CIMISError(f"{e} Recompute it with `nnUNetv2_cimis_step_memory`.") from None
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise CIMISError(f"{path} is not a step memory of format {FORMAT_VERSION}. Recompute it with "
                             f"`nnUNetv2_cimis_step_memory`.")
        try:
            return cls(labels={int(k): v for k, v in d["labels"].items()}, prototype_tap=d["prototype_tap"],
                       prototypes=d["prototypes"], prototype_counts=d["prototype_counts"],
                       norm_stats=d["norm_stats"], label_bank=d["label_bank"], patch_size=d["patch_size"],
                       extra=d.get("extra", {}))
        except (KeyError, ValueError) as e:
            raise CIMISError(f"{path} is an incomplete step memory ({e!r}). Recompute it with "
                             f"`nnUNetv2_cimis_step_memory`.") from None


def carry_forward(new: StepMemory, old: Optional[StepMemory], old_labels) -> StepMemory:
    """Replace the rows of ``old_labels`` in ``new`` by the teacher's stored prototypes.

    Old classes have no labelled voxel in the step's data; their global prototypes come from the step that
    learned them. Rows the teacher had no prototype for stay as computed.
    """
    if old is None:
        return new
    protos = new.prototypes.clone()
    counts = new.prototype_counts.clone()
    if old.prototypes.shape[1] != protos.shape[1]:
        raise CIMISError(f"The teacher's prototypes have {old.prototypes.shape[1]} channels but this model's "
                         f"tap {new.prototype_tap} has {protos.shape[1]}: teacher and student differ in "
                         f"architecture. Use the plans of the first step for every step.")
    for v in old_labels:
        if old.has_prototype(v):
            protos[v] = old.prototypes[v]
            counts[v] = old.prototype_counts[v]
    new.prototypes, new.prototype_counts = protos, counts
    return new

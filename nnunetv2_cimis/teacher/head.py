"""Widening the segmentation head of a step's student.

nnU-Net's U-Net ends in one 1x1 convolution per deep-supervision scale (``decoder.seg_layers[k]``). The
student of step t has ``n_old + n_new`` outputs where the teacher had ``n_old`` (background included). Every
weight outside the head is copied from the teacher; in each head the old rows are copied and the new rows
are initialised as MiB does (Cermelli et al., CVPR 2020, "Modeling the Background for Incremental
Learning in Semantic Segmentation"):

* new-class weights = background weights;
* new-class biases and the background bias = ``b_bg - log(n_new + 1)``,

so that at the first iteration the new classes and background share the teacher's background
probability equally and the old classes' probabilities are unchanged.

``init="random"`` keeps the new rows as the freshly built student has them (nnU-Net's He initialisation,
bias 0) and leaves the background row untouched: what MiB's official code does for fine-tuning, LwF and ILT.
How the two interact with nnU-Net's SGD (momentum 0.99) is measured in ``docs/trainers_baselines.md``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from nnunetv2_cimis.errors import CIMISError

HEAD_KEY = ".seg_layers."


def _is_head_key(key: str) -> bool:
    return HEAD_KEY in f".{key}"


HEAD_INITS = ("mib", "random")


def widen_head_state(teacher_state: Dict[str, torch.Tensor], student_state: Dict[str, torch.Tensor],
                     n_old: int, init: str = "mib") -> Dict[str, torch.Tensor]:
    """Build the student's initial state dict from the teacher's.

    Args:
        teacher_state: teacher ``state_dict`` (``n_old`` output channels in every head).
        student_state: the freshly built student's ``state_dict`` (``n_old + n_new`` outputs); used for the
            target shapes.
        n_old: number of teacher outputs, background included.
        init: ``"mib"`` (MiB's initialisation of the new rows) or ``"random"`` (the student's own fresh rows).

    Returns:
        A state dict for the student.

    Raises:
        CIMISError: if the two networks differ outside the head, or the teacher's head does not have
            ``n_old`` outputs (a teacher of another architecture or of another step).
    """
    if init not in HEAD_INITS:
        raise CIMISError(f"head initialisation must be one of {HEAD_INITS}, got {init!r}")
    missing = sorted(set(student_state) - set(teacher_state))
    unexpected = sorted(set(teacher_state) - set(student_state))
    if missing or unexpected:
        raise CIMISError(
            f"The teacher's architecture differs from the student's (missing in teacher: {missing[:3]}, extra in "
            f"teacher: {unexpected[:3]}). Every step must use the plans of the first step: move them with "
            f"nnUNetv2_move_plans_between_datasets and preprocess with the same plans identifier.")
    out = {}
    for key, s in student_state.items():
        t = teacher_state[key]
        if not _is_head_key(key):
            if t.shape != s.shape:
                raise CIMISError(
                    f"The teacher's parameter {key} has shape {tuple(t.shape)} but the student's has {tuple(s.shape)}:"
                    f" teacher and student were built from different plans. Use the first step's plans for every "
                    f"step (same plans identifier and configuration).")
            out[key] = t.clone()
            continue
        if t.shape[0] != n_old:
            raise CIMISError(
                f"The teacher's head {key} has {t.shape[0]} outputs but the step metadata says the teacher knows "
                f"{n_old} labels (background included). The teacher checkpoint belongs to another step or dataset.")
        if s.shape[0] < n_old or t.shape[1:] != s.shape[1:]:
            raise CIMISError(f"Cannot widen head {key} from {tuple(t.shape)} to {tuple(s.shape)}")
        n_new = s.shape[0] - n_old
        w = s.clone()
        w[:n_old] = t
        if init == "random":
            out[key] = w
            continue
        if key.endswith("bias"):
            shift = math.log(n_new + 1)
            w[n_old:] = t[0] - shift
            if n_new > 0:
                w[0] = t[0] - shift
        else:
            w[n_old:] = t[0:1].expand((n_new,) + tuple(t.shape[1:]))
        out[key] = w
    return out


def widen_student_from_teacher(student: nn.Module, teacher: nn.Module, n_old: int, init: str = "mib") -> None:
    """Load the teacher's weights into ``student`` in place, widening every segmentation head (``init``: see
    :func:`widen_head_state`)."""
    state = widen_head_state(teacher.state_dict(), student.state_dict(), n_old, init)
    student.load_state_dict(state)

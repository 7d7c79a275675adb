"""Continual-learning metrics of class-incremental segmentation, from per-case per-class Dice.

Input layout (every function): ``case_dice[trainer][step][label] = [Dice of case 1, case 2, ...]`` where
``label`` is the class's global integer value and ``step`` the index of the step whose model was evaluated;
NaN marks a case where the class is absent from both reference and prediction (nnU-Net's convention).
``classes_per_step[t]`` lists the labels learned at step ``t``.

Definitions (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018, for forgetting;
Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, for backward
transfer; adapted from accuracy to per-class Dice as in class-incremental segmentation papers):

* per-class Dice ``D[s][c]``: mean over test cases, NaN cases ignored (NaN if all cases are NaN);
* at step ``s``: ``old`` = mean of ``D[s][c]`` over classes learned before ``s``, ``new`` = over classes
  learned at ``s``, ``all`` = over classes learned up to ``s`` (a mean over classes, not over voxels; NaN
  classes ignored; NaN if no class has a value, e.g. ``old`` at step 0);
* forgetting of an old class ``c`` (learned at ``l(c) < T``, ``T`` the last evaluated step of the trainer):
  ``max_{l(c) <= s < T} D[s][c] - D[T][c]`` (positive = forgotten);
* backward transfer: ``BWT = mean_c (D[T][c] - D[l(c)][c])`` over classes learned before ``T`` (negative =
  forgetting; 0 for a model that does not change).

Only the standard library and numpy are used.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnunetv2_cimis.errors import CIMISError

CaseDice = Mapping[str, Mapping[int, Mapping[int, Sequence[float]]]]
PerClass = Dict[str, Dict[int, Dict[int, float]]]


def nanmean(values) -> float:
    """Mean of the finite values; NaN if there are none (no warning)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def learned_at(classes_per_step: Sequence[Sequence[int]]) -> Dict[int, int]:
    """Map each label to the step that learns it.

    Raises:
        CIMISError: a label listed at two steps, or label 0 (background) listed.
    """
    out: Dict[int, int] = {}
    for step, labels in enumerate(classes_per_step):
        for c in labels:
            c = int(c)
            if c == 0:
                raise CIMISError("classes_per_step must not list the background label 0")
            if c in out:
                raise CIMISError(f"label {c} is listed at step {out[c]} and at step {step}; each class is learned "
                                 f"once")
            out[c] = step
    return out


def per_class_dice(case_dice: CaseDice) -> PerClass:
    """``D[trainer][step][label]``: mean Dice over cases, NaN-aware."""
    return {tr: {int(s): {int(c): nanmean(v) for c, v in by_class.items()} for s, by_class in by_step.items()}
            for tr, by_step in case_dice.items()}


def step_means(per_class: PerClass,
               classes_per_step: Sequence[Sequence[int]]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """``{trainer: {step: {"old": ..., "new": ..., "all": ...}}}`` from per-class Dice (see module docstring)."""
    learned_at(classes_per_step)  # validates
    out: Dict[str, Dict[int, Dict[str, float]]] = {}
    for tr, by_step in per_class.items():
        out[tr] = {}
        for s, d in sorted(by_step.items()):
            if not 0 <= s < len(classes_per_step):
                raise CIMISError(f"trainer {tr}: step {s} is outside the scenario's {len(classes_per_step)} steps")
            old = [c for t in classes_per_step[:s] for c in t]
            new = list(classes_per_step[s])
            out[tr][s] = {"old": nanmean(d.get(c, float("nan")) for c in old),
                          "new": nanmean(d.get(c, float("nan")) for c in new),
                          "all": nanmean(d.get(c, float("nan")) for c in old + new)}
    return out


def final_step(by_step: Mapping[int, Mapping[int, float]]) -> int:
    """The last evaluated step of a trainer."""
    if not by_step:
        raise CIMISError("no evaluated step")
    return max(int(s) for s in by_step)


def forgetting(per_class: PerClass, classes_per_step: Sequence[Sequence[int]]) -> Dict[str, Dict[int, float]]:
    """``{trainer: {label: forgetting}}`` for every class learned before the trainer's last evaluated step.

    NaN where the final Dice or every earlier Dice of the class is NaN or missing.
    """
    when = learned_at(classes_per_step)
    out: Dict[str, Dict[int, float]] = {}
    for tr, by_step in per_class.items():
        T = final_step(by_step)
        out[tr] = {}
        for c, l in sorted(when.items()):
            if l >= T:
                continue
            final = by_step[T].get(c, float("nan"))
            earlier = [by_step[s].get(c, float("nan")) for s in range(l, T) if s in by_step]
            earlier = [v for v in earlier if not math.isnan(v)]
            out[tr][c] = float(max(earlier) - final) if earlier and not math.isnan(final) else float("nan")
    return out


def backward_transfer(per_class: PerClass, classes_per_step: Sequence[Sequence[int]]) -> Dict[str, float]:
    """``{trainer: BWT}``; NaN when no old class has both Dice values (e.g. only step 0 evaluated)."""
    when = learned_at(classes_per_step)
    out: Dict[str, float] = {}
    for tr, by_step in per_class.items():
        T = final_step(by_step)
        diffs = []
        for c, l in when.items():
            if l >= T or l not in by_step:
                continue
            diffs.append(by_step[T].get(c, float("nan")) - by_step[l].get(c, float("nan")))
        out[tr] = nanmean(diffs)
    return out


def summarize(case_dice: CaseDice, classes_per_step: Sequence[Sequence[int]]) -> dict:
    """All metrics at once.

    Returns:
        ``{"per_class": D, "steps": step_means, "forgetting": ..., "mean_forgetting": {trainer: mean over
        old classes}, "bwt": ..., "final_step": {trainer: T}}``.
    """
    d = per_class_dice(case_dice)
    f = forgetting(d, classes_per_step)
    return {"per_class": d,
            "steps": step_means(d, classes_per_step),
            "forgetting": f,
            "mean_forgetting": {tr: nanmean(v.values()) for tr, v in f.items()},
            "bwt": backward_transfer(d, classes_per_step),
            "final_step": {tr: final_step(by_step) for tr, by_step in d.items()}}


def case_dice_from_rows(rows: List[Mapping], metric: str = "Dice",
                        label_of: Optional[Mapping[str, int]] = None) -> Dict[str, Dict[int, Dict[int, List[float]]]]:
    """Group long rows (keys step, trainer, case, class, metric, value) into ``case_dice``.

    ``class`` is a label name (then ``label_of`` maps it to its value) or a label value.
    """
    out: Dict[str, Dict[int, Dict[int, List[float]]]] = {}
    for r in rows:
        if r["metric"] != metric:
            continue
        c = r["class"]
        c = int(label_of[c]) if label_of is not None and c in label_of else int(c)
        out.setdefault(str(r["trainer"]), {}).setdefault(int(r["step"]), {}).setdefault(c, []).append(
            float(r["value"]))
    return out

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
  forgetting; 0 for a model that does not change);
* a class is *never learned* by a trainer when its Dice is below ``eps`` (default
  :data:`NEVER_LEARNED_EPS`) at every evaluated step that scores it (``l(c) <= s <= T``, NaN steps left out,
  at least one finite value). Its forgetting is undefined (a class that was never known cannot be forgotten;
  the raw formula would give 0, "no forgetting"), so :func:`summarize` reports it as NaN, lists the class
  under ``never_learned`` and leaves it out of mean forgetting and BWT.

Only the standard library and numpy are used.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnunetv2_cimis.errors import CIMISError

NEVER_LEARNED_EPS = 0.01
"""Dice below which a class counts as not learned at a step (see :func:`never_learned`)."""

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


def never_learned(per_class: PerClass, classes_per_step: Sequence[Sequence[int]],
                  eps: float = NEVER_LEARNED_EPS) -> Dict[str, List[int]]:
    """``{trainer: [labels]}``: classes (learned at a step ``<= T``) whose Dice is below ``eps`` at every
    evaluated step ``l(c) <= s <= T``; steps where the class is NaN or missing are left out, and a class
    without any finite value is not listed (it cannot be judged).
    """
    when = learned_at(classes_per_step)
    out: Dict[str, List[int]] = {}
    for tr, by_step in per_class.items():
        T = final_step(by_step)
        out[tr] = []
        for c, l in sorted(when.items()):
            if l > T:
                continue
            vals = [by_step[s].get(c, float("nan")) for s in range(l, T + 1) if s in by_step]
            vals = [v for v in vals if not math.isnan(v)]
            if vals and max(vals) < eps:
                out[tr].append(c)
    return out


def forgetting(per_class: PerClass, classes_per_step: Sequence[Sequence[int]],
               never: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Dict[int, float]]:
    """``{trainer: {label: forgetting}}`` for every class learned before the trainer's last evaluated step.

    NaN where the final Dice or every earlier Dice of the class is NaN or missing, and for the classes that
    ``never`` (the output of :func:`never_learned`) lists for the trainer.
    """
    when = learned_at(classes_per_step)
    out: Dict[str, Dict[int, float]] = {}
    for tr, by_step in per_class.items():
        T = final_step(by_step)
        skip = set(never.get(tr, ())) if never else set()
        out[tr] = {}
        for c, l in sorted(when.items()):
            if l >= T:
                continue
            if c in skip:
                out[tr][c] = float("nan")
                continue
            final = by_step[T].get(c, float("nan"))
            earlier = [by_step[s].get(c, float("nan")) for s in range(l, T) if s in by_step]
            earlier = [v for v in earlier if not math.isnan(v)]
            out[tr][c] = float(max(earlier) - final) if earlier and not math.isnan(final) else float("nan")
    return out


def backward_transfer(per_class: PerClass, classes_per_step: Sequence[Sequence[int]],
                      never: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, float]:
    """``{trainer: BWT}``; NaN when no old class has both Dice values (e.g. only step 0 evaluated). Classes that
    ``never`` lists for a trainer are left out."""
    when = learned_at(classes_per_step)
    out: Dict[str, float] = {}
    for tr, by_step in per_class.items():
        T = final_step(by_step)
        skip = set(never.get(tr, ())) if never else set()
        diffs = []
        for c, l in when.items():
            if l >= T or l not in by_step or c in skip:
                continue
            diffs.append(by_step[T].get(c, float("nan")) - by_step[l].get(c, float("nan")))
        out[tr] = nanmean(diffs)
    return out


def summarize(case_dice: CaseDice, classes_per_step: Sequence[Sequence[int]],
              eps: float = NEVER_LEARNED_EPS) -> dict:
    """All metrics at once.

    Returns:
        ``{"per_class": D, "steps": step_means, "forgetting": ... (NaN for never-learned classes),
        "mean_forgetting": {trainer: mean over the old classes that were learned}, "bwt": ... (learned classes
        only), "never_learned": {trainer: [labels]}, "learned_old": {trainer: number of old classes with a
        finite forgetting}, "final_step": {trainer: T}}``.
    """
    d = per_class_dice(case_dice)
    never = never_learned(d, classes_per_step, eps)
    f = forgetting(d, classes_per_step, never)
    return {"per_class": d,
            "steps": step_means(d, classes_per_step),
            "forgetting": f,
            "mean_forgetting": {tr: nanmean(v.values()) for tr, v in f.items()},
            "bwt": backward_transfer(d, classes_per_step, never),
            "never_learned": never,
            "learned_old": {tr: sum(1 for v in fv.values() if not math.isnan(v)) for tr, fv in f.items()},
            "final_step": {tr: final_step(by_step) for tr, by_step in d.items()}}


def at_a_glance(summary: dict, classes_per_step: Sequence[Sequence[int]], trainers: Sequence[str],
                ft_trainer: Optional[str] = "nnUNetTrainerFT",
                joint_trainer: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """The headline figures of each trainer (the joint model left out), from :func:`summarize`'s output.

    Per trainer ``t`` with final step ``T``:

    * ``new_dice`` (X): mean over the incremental steps ``1 <= s <= T`` that were evaluated of the step's
      new-class Dice (``steps[t][s]["new"]``, itself a mean over the step's new classes); NaN if ``T = 0``;
    * ``ft_new_dice`` (Y): the same figure of ``ft_trainer`` (NaN if it was not evaluated);
    * ``old_kept`` (Z): mean of ``D[T][c]`` over the old classes (``l(c) < T``) divided by the joint model's
      mean Dice over the same classes (its last evaluated step; classes NaN in either model left out); NaN
      without a joint model, without old classes or when the joint model's mean is 0;
    * ``mean_forgetting`` (F), ``learned_old``, ``never_learned``: as in :func:`summarize`.
    """
    when = learned_at(classes_per_step)
    steps = summary["steps"]

    def new_dice(t: str) -> float:
        if t not in steps:
            return float("nan")
        return nanmean(m["new"] for s, m in steps[t].items() if s >= 1)

    joint_d = None
    if joint_trainer and joint_trainer in summary["per_class"]:
        jd = summary["per_class"][joint_trainer]
        joint_d = jd[final_step(jd)]
    out: Dict[str, Dict[str, float]] = {}
    for t in trainers:
        if t == joint_trainer or t not in summary["per_class"]:
            continue
        T = summary["final_step"][t]
        d = summary["per_class"][t][T]
        kept = float("nan")
        if joint_d is not None:
            pairs = [(d.get(c, float("nan")), joint_d.get(c, float("nan"))) for c, l in when.items() if l < T]
            pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
            if pairs and sum(b for _, b in pairs) > 0:
                kept = float(sum(a for a, _ in pairs) / sum(b for _, b in pairs))
        out[t] = {"new_dice": new_dice(t),
                  "ft_new_dice": new_dice(ft_trainer) if ft_trainer else float("nan"),
                  "old_kept": kept,
                  "mean_forgetting": summary["mean_forgetting"][t],
                  "learned_old": summary["learned_old"][t],
                  "never_learned": list(summary["never_learned"][t])}
    return out


def bound_failures(summary: dict, ft_trainer: Optional[str] = "nnUNetTrainerFT",
                   joint_trainer: Optional[str] = None, joint_bound: float = 0.80,
                   ft_new_bound: float = 0.6) -> List[str]:
    """Why the bounds of the comparison are under-trained (empty list: they are not, or cannot be checked).

    The joint model fails when its mean Dice over all classes at its last evaluated step is below
    ``joint_bound``; fine-tuning fails when its new-class Dice is below ``ft_new_bound`` at any evaluated step
    (step 0, the shared starting model, included). NaN figures (no test case holds the classes) are skipped.
    """
    out = []
    steps = summary["steps"]
    if joint_trainer and joint_trainer in steps:
        by = steps[joint_trainer]
        v = by[max(by)]["all"]
        if not math.isnan(v) and v < joint_bound:
            out.append(f"joint model {joint_trainer}: mean Dice over all classes {v:.3f} < {joint_bound:.2f}")
    if ft_trainer and ft_trainer in steps:
        low = [f"{m['new']:.3f} at step {s}" for s, m in sorted(steps[ft_trainer].items())
               if not math.isnan(m["new"]) and m["new"] < ft_new_bound]
        if low:
            out.append(f"fine-tuning {ft_trainer}: new-class Dice {', '.join(low)} (bound {ft_new_bound:.2f})")
    return out


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

"""Write the continual evaluation: long CSV, JSON summary, Markdown tables and a plot.

Files written into ``output_dir`` by :func:`write_report`:

==================  ==============================================================================
``scores.csv``      one row per (step, trainer, case, class, metric): columns ``step, trainer, case,
                    class, metric, value`` (class = label name; value empty for NaN)
``summary.json``    labels, classes per step, per-class Dice, old/new/all means, forgetting, BWT
``report.md``       "At a glance" (one line per method, and a WARNING when the bounds are under-trained),
                    then the Markdown tables (also returned)
``dice_per_class.png``  per-class Dice across steps, one subplot per class, one line per trainer
==================  ==============================================================================
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import List, Mapping, Optional, Sequence

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.evaluation import continual_metrics as cm

CSV_COLUMNS = ("step", "trainer", "case", "class", "metric", "value")
CSV_NAME = "scores.csv"
SUMMARY_NAME = "summary.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "dice_per_class.png"
FT_TRAINER = "nnUNetTrainerFT"
JOINT_BOUND = 0.80
"""Default lowest mean Dice over all classes of the joint model for a meaningful comparison."""
FT_NEW_BOUND = 0.6
"""Default lowest new-class Dice of fine-tuning, at every step, for a meaningful comparison."""
UNDER_TRAINED = "the bounds are under-trained; the comparison is not meaningful"


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _json_value(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_long_csv(rows: Sequence[Mapping], path: str) -> None:
    """Write rows (dicts with the keys of :data:`CSV_COLUMNS`) as CSV; NaN values become empty cells."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        w.writeheader()
        for r in rows:
            v = r["value"]
            w.writerow({**{k: r[k] for k in CSV_COLUMNS},
                        "value": "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))})


def read_long_csv(path: str) -> List[dict]:
    """Read :func:`write_long_csv`'s file back (empty values as NaN, steps as int)."""
    with open(path, newline="") as f:
        return [{**r, "step": int(r["step"]), "value": float(r["value"]) if r["value"] != "" else float("nan")}
                for r in csv.DictReader(f)]


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.0f} %"


def bounds_warning(summary: dict, ft_trainer: Optional[str] = FT_TRAINER, joint_trainer: Optional[str] = None,
                   joint_bound: float = JOINT_BOUND, ft_new_bound: float = FT_NEW_BOUND) -> Optional[str]:
    """The WARNING line when the joint model or fine-tuning is below its bound, else None
    (see :func:`continual_metrics.bound_failures`)."""
    failures = cm.bound_failures(summary, ft_trainer, joint_trainer, joint_bound, ft_new_bound)
    if not failures:
        return None
    return f"WARNING: {UNDER_TRAINED} ({'; '.join(failures)})"


def glance_lines(summary: dict, label_names: Mapping[int, str], classes_per_step: Sequence[Sequence[int]],
                 trainers: Sequence[str], joint_trainer: Optional[str] = None,
                 ft_trainer: Optional[str] = FT_TRAINER, joint_bound: float = JOINT_BOUND,
                 ft_new_bound: float = FT_NEW_BOUND) -> List[str]:
    """The "at a glance" lines (plain text): the bounds warning or a note, then one line per continual method
    ``NAME: new classes learned: Dice X (FT: Y); old classes kept: Z % of joint; mean forgetting F``
    (definitions in :func:`continual_metrics.at_a_glance` and docs/evaluation.md)."""
    out = []
    warning = bounds_warning(summary, ft_trainer, joint_trainer, joint_bound, ft_new_bound)
    if warning:
        out.append(warning)
    missing = [what for what, t in (("joint model", joint_trainer), ("fine-tuning", ft_trainer))
               if not t or t not in summary["steps"]]
    if missing:
        out.append(f"note: no {' and no '.join(missing)} evaluated: the bounds of the comparison are not checked")
    glance = cm.at_a_glance(summary, classes_per_step, trainers, ft_trainer, joint_trainer)
    for t, g in glance.items():
        never = [label_names.get(c, str(c)) for c in g["never_learned"]]
        if math.isnan(g["mean_forgetting"]):
            f = "n/a (no old class was learned)" if never and g["learned_old"] == 0 else "n/a"
        else:
            f = f"{g['mean_forgetting']:.3f} ({g['learned_old']} learned old classes)"
        line = (f"{t}: new classes learned: Dice {_fmt(g['new_dice'])} (FT: {_fmt(g['ft_new_dice'])}); "
                f"old classes kept: {_pct(g['old_kept'])} of joint; mean forgetting {f}")
        if never:
            line += f"; never learned: {len(never)} class{'es' if len(never) > 1 else ''} ({', '.join(never)})"
        out.append(line)
    return out


def markdown_tables(summary: dict, label_names: Mapping[int, str], classes_per_step: Sequence[Sequence[int]],
                    trainers: Sequence[str], joint_trainer: Optional[str] = None,
                    glance: Optional[Sequence[str]] = None) -> str:
    """The Markdown report: the ``glance`` lines (:func:`glance_lines`) first, then old/new/all mean Dice per
    trainer and step, per-class Dice, forgetting and BWT."""
    when = cm.learned_at(classes_per_step)
    labels = sorted(when)
    mark = {t: (f"{t} (joint, upper bound)" if t == joint_trainer else t) for t in trainers}
    out = []
    if glance:
        out += ["## At a glance", ""]
        for line in glance:
            if line.startswith("WARNING"):
                out += [f"> **{line}**", ""]
            elif line.startswith("note:"):
                out += [f"> {line}", ""]
            else:
                out.append(f"- {line}")
        out += ["", "new classes learned = mean over the incremental steps of the new-class Dice (FT: the same "
                "for fine-tuning); old classes kept = final-step Dice on the old classes / the joint model's Dice "
                "on the same classes; mean forgetting over the old classes that were learned (definitions in "
                "docs/evaluation.md).", ""]
    out += ["## Mean Dice per step", "",
           "old = classes learned before the step, new = learned at the step, all = learned up to the step.", "",
           "| trainer | step | old | new | all |", "| --- | --- | --- | --- | --- |"]
    for t in trainers:
        for s, m in sorted(summary["steps"].get(t, {}).items()):
            out.append(f"| {mark[t]} | {s} | {_fmt(m['old'])} | {_fmt(m['new'])} | {_fmt(m['all'])} |")
    out += ["", "## Dice per class", "",
            "| trainer | step | " + " | ".join(f"{label_names.get(c, c)} (s{when[c]})" for c in labels) + " |",
            "| --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for t in trainers:
        for s, d in sorted(summary["per_class"].get(t, {}).items()):
            cells = [_fmt(d[c]) if c in d and when[c] <= s else "" for c in labels]
            out.append(f"| {mark[t]} | {s} | " + " | ".join(cells) + " |")
    old_labels = [c for c in labels if when[c] < len(classes_per_step) - 1]
    out += ["", "## Forgetting and backward transfer", "",
            "Forgetting of an old class = best Dice at an earlier step minus Dice at the final step (lower is "
            "better). BWT = mean over old classes of final Dice minus Dice right after learning them (higher is "
            "better). A class whose Dice stayed below "
            f"{summary.get('never_learned_eps', cm.NEVER_LEARNED_EPS)} at every step is \"never learned\": it "
            "has no forgetting and is left out of both means.", "",
            "| trainer | final step | BWT | mean forgetting | " +
            " | ".join(f"forgetting {label_names.get(c, c)}" for c in old_labels) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in old_labels) + " |"]
    for t in trainers:
        if t not in summary["bwt"]:
            continue
        f = summary["forgetting"][t]
        never = set(summary.get("never_learned", {}).get(t, ()))
        mean_f = _fmt(summary["mean_forgetting"][t])
        if never & set(f):
            mean_f += f" ({sum(1 for c in f if c in never)} never learned)"
        out.append(f"| {mark[t]} | {summary['final_step'][t]} | {_fmt(summary['bwt'][t])} | {mean_f} | " +
                   " | ".join(("never learned" if c in never else _fmt(f[c])) if c in f else ""
                              for c in old_labels) + " |")
    return "\n".join(out) + "\n"


def plot_per_class(summary: dict, label_names: Mapping[int, str], classes_per_step: Sequence[Sequence[int]],
                   trainers: Sequence[str], path: str, joint_trainer: Optional[str] = None) -> None:
    """PNG grid: one subplot per class (x = step, y = Dice), one line per trainer (the joint model dashed)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    when = cm.learned_at(classes_per_step)
    labels = sorted(when)
    n = len(labels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    steps = list(range(len(classes_per_step)))
    for i, c in enumerate(labels):
        ax = axes[i // cols][i % cols]
        for t in trainers:
            by_step = summary["per_class"].get(t, {})
            xs = [s for s in steps if s in by_step and c in by_step[s] and when[c] <= s]
            ys = [by_step[s][c] for s in xs]
            style = "--" if t == joint_trainer else "-"
            ax.plot(xs, ys, style, marker="o", label=t)
        ax.set_title(f"{label_names.get(c, c)} (learned at step {when[c]})", fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("Dice")
        if i // cols == rows - 1:
            ax.set_xlabel("step")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: Sequence[Mapping], label_names: Mapping[int, str],
                 classes_per_step: Sequence[Sequence[int]], output_dir: str,
                 trainers: Optional[Sequence[str]] = None, joint_trainer: Optional[str] = None,
                 extra_summary: Optional[dict] = None, print_table: bool = False,
                 ft_trainer: Optional[str] = FT_TRAINER, joint_bound: float = JOINT_BOUND,
                 ft_new_bound: float = FT_NEW_BOUND, never_learned_eps: float = cm.NEVER_LEARNED_EPS) -> str:
    """Write ``scores.csv``, ``summary.json``, ``report.md`` and ``dice_per_class.png``; return the Markdown.

    The "at a glance" lines (and the WARNING when the joint model's mean Dice over all classes is below
    ``joint_bound`` or fine-tuning's new-class Dice is below ``ft_new_bound`` at some step) open
    ``report.md`` and are always printed on the console, after the tables when ``print_table``.

    Args:
        rows: long rows (keys step, trainer, case, class, metric, value); class = label name. Continual
            metrics use the rows with metric ``Dice``.
        label_names: label value -> name (background may be included; it is ignored).
        classes_per_step: labels learned at each step.
        output_dir: created if missing.
        trainers: order of trainers in tables and plot (default: order of first appearance).
        joint_trainer: name of the joint (upper-bound) model among the trainers, marked in tables and plot.
        extra_summary: more keys for summary.json (scenario, datasets, missing models, ...).
        print_table: also print the Markdown.
        ft_trainer: the fine-tuning run (lower bound) among the trainers.
        joint_bound, ft_new_bound: the bounds of the warning.
        never_learned_eps: Dice below which a class counts as not learned at a step.

    Raises:
        CIMISError: no Dice rows, or a class name that ``label_names`` does not know.
    """
    label_names = {int(k): v for k, v in label_names.items()}
    value_of = {v: k for k, v in label_names.items()}
    unknown = sorted({r["class"] for r in rows} - set(value_of))
    if unknown:
        raise CIMISError(f"rows name classes {unknown} that are not among the labels {sorted(value_of)}")
    case_dice = cm.case_dice_from_rows(list(rows), "Dice", value_of)
    if not case_dice:
        raise CIMISError("there are no Dice scores to report (no rows with metric 'Dice')")
    if trainers is None:
        trainers = list(dict.fromkeys(str(r["trainer"]) for r in rows))
    summary = cm.summarize(case_dice, classes_per_step, never_learned_eps)
    summary["never_learned_eps"] = never_learned_eps
    os.makedirs(output_dir, exist_ok=True)
    write_long_csv(rows, os.path.join(output_dir, CSV_NAME))
    glance = glance_lines(summary, label_names, classes_per_step, trainers, joint_trainer, ft_trainer,
                          joint_bound, ft_new_bound)
    md = markdown_tables(summary, label_names, classes_per_step, trainers, joint_trainer, glance)
    with open(os.path.join(output_dir, MARKDOWN_NAME), "w") as f:
        f.write(md)
    plot_per_class(summary, label_names, classes_per_step, trainers, os.path.join(output_dir, PLOT_NAME),
                   joint_trainer)

    name = lambda c: label_names.get(c, str(c))  # noqa: E731
    js = {
        "labels": {name(c): c for c in sorted(label_names) if c != 0},
        "classes_per_step": [[int(c) for c in s] for s in classes_per_step],
        "trainers": list(trainers),
        "joint_trainer": joint_trainer,
        "per_class_dice": {t: {str(s): {name(c): _json_value(v) for c, v in d.items()} for s, d in by.items()}
                           for t, by in summary["per_class"].items()},
        "mean_dice": {t: {str(s): {k: _json_value(v) for k, v in m.items()} for s, m in by.items()}
                      for t, by in summary["steps"].items()},
        "forgetting": {t: {name(c): _json_value(v) for c, v in f.items()} for t, f in summary["forgetting"].items()},
        "mean_forgetting": {t: _json_value(v) for t, v in summary["mean_forgetting"].items()},
        "bwt": {t: _json_value(v) for t, v in summary["bwt"].items()},
        "never_learned": {t: [name(c) for c in v] for t, v in summary["never_learned"].items()},
        "never_learned_eps": never_learned_eps,
        "at_a_glance": {t: {k: ([name(c) for c in v] if k == "never_learned" else _json_value(v))
                            for k, v in g.items()}
                        for t, g in cm.at_a_glance(summary, classes_per_step, trainers, ft_trainer,
                                                   joint_trainer).items()},
        "at_a_glance_lines": glance,
        "bounds": {"joint_bound": joint_bound, "ft_new_bound": ft_new_bound, "ft_trainer": ft_trainer,
                   "warning": bounds_warning(summary, ft_trainer, joint_trainer, joint_bound, ft_new_bound)},
        "final_step": summary["final_step"],
        "files": {"scores": CSV_NAME, "markdown": MARKDOWN_NAME, "plot": PLOT_NAME},
    }
    if extra_summary:
        js.update(extra_summary)
    with open(os.path.join(output_dir, SUMMARY_NAME), "w") as f:
        json.dump(js, f, indent=2)
    if print_table:
        print(md)
    print_glance(glance)
    return md


def print_glance(lines: Sequence[str]) -> None:
    """Print the "at a glance" lines on the console; a WARNING line framed so that it cannot be missed."""
    print("At a glance:")
    for line in lines:
        if line.startswith("WARNING"):
            bar = "!" * min(len(line), 100)
            print(f"{bar}\n{line}\n{bar}")
        else:
            print(f"  {line}")

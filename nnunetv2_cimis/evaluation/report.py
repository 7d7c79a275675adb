"""Write the continual evaluation: long CSV, JSON summary, Markdown tables and a plot.

Files written into ``output_dir`` by :func:`write_report`:

==================  ==============================================================================
``scores.csv``      one row per (step, trainer, case, class, metric): columns ``step, trainer, case,
                    class, metric, value`` (class = label name; value empty for NaN)
``summary.json``    labels, classes per step, per-class Dice, old/new/all means, forgetting, BWT
``report.md``       the Markdown tables (also returned)
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


def markdown_tables(summary: dict, label_names: Mapping[int, str], classes_per_step: Sequence[Sequence[int]],
                    trainers: Sequence[str], joint_trainer: Optional[str] = None) -> str:
    """The Markdown report: old/new/all mean Dice per trainer and step, per-class Dice, forgetting and BWT."""
    when = cm.learned_at(classes_per_step)
    labels = sorted(when)
    mark = {t: (f"{t} (joint, upper bound)" if t == joint_trainer else t) for t in trainers}
    out = ["## Mean Dice per step", "",
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
            "better).", "",
            "| trainer | final step | BWT | mean forgetting | " +
            " | ".join(f"forgetting {label_names.get(c, c)}" for c in old_labels) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in old_labels) + " |"]
    for t in trainers:
        if t not in summary["bwt"]:
            continue
        f = summary["forgetting"][t]
        out.append(f"| {mark[t]} | {summary['final_step'][t]} | {_fmt(summary['bwt'][t])} | "
                   f"{_fmt(summary['mean_forgetting'][t])} | " +
                   " | ".join(_fmt(f[c]) if c in f else "" for c in old_labels) + " |")
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
                 extra_summary: Optional[dict] = None, print_table: bool = False) -> str:
    """Write ``scores.csv``, ``summary.json``, ``report.md`` and ``dice_per_class.png``; return the Markdown.

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
    summary = cm.summarize(case_dice, classes_per_step)
    os.makedirs(output_dir, exist_ok=True)
    write_long_csv(rows, os.path.join(output_dir, CSV_NAME))
    md = markdown_tables(summary, label_names, classes_per_step, trainers, joint_trainer)
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
        "final_step": summary["final_step"],
        "files": {"scores": CSV_NAME, "markdown": MARKDOWN_NAME, "plot": PLOT_NAME},
    }
    if extra_summary:
        js.update(extra_summary)
    with open(os.path.join(output_dir, SUMMARY_NAME), "w") as f:
        json.dump(js, f, indent=2)
    if print_table:
        print(md)
    return md

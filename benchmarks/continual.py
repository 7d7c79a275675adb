"""Run several trainers side by side on one scenario and write the continual evaluation.

Default: the built-in phantom scenario (the demo's phantom, scenario and network; ``--kind`` picks the 3D CT or
the 2D laparoscopic one) with every continual trainer, once per ``--seeds`` value (phantom and patient split
differ per seed), then the mean +- std over seeds of each trainer's final old / new / all Dice, mean
forgetting and BWT, and the wall time, as ``seeds_summary.json`` and ``seeds_table.md`` in ``--output``.
With ``--dataset``: any scenario made by ``nnUNetv2_cimis_make_scenario`` (give any of its step datasets; the
environment's nnUNet_raw / _preprocessed / _results are used), e.g. a BTCV "4-4-5" scenario on a GPU machine.

Examples::

    python benchmarks/continual.py --output runs/phantom --seeds 0 1 2
    python benchmarks/continual.py --output runs/phantom --trainers nnUNetTrainerFT nnUNetTrainerMiB --seeds 0
    python benchmarks/continual.py --output runs/btcv --dataset 501 -c 3d_fullres -p nnUNetPlans \\
        --trainers nnUNetTrainerMiB nnUNetTrainerPGCDDAPD --iterations 250 --epochs 100
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from nnunetv2_cimis.errors import CIMISError, cli_entry

FIGURES = ("old", "new", "all", "mean_forgetting", "bwt", "old_kept")
COMPARE_FIGURES = ("old", "new", "all")


def _final(summary: dict, trainer: str) -> Dict[str, float]:
    """A trainer's final-step old / new / all Dice, mean forgetting, BWT and old classes kept (final-step old Dice
    / the joint model's Dice on the same classes, the report's "at a glance") from a summary.json."""
    steps = summary["mean_dice"][trainer]
    final = steps[str(max(int(k) for k in steps))]
    out = {k: final.get(k) for k in ("old", "new", "all")}
    out["mean_forgetting"] = summary.get("mean_forgetting", {}).get(trainer)
    out["bwt"] = summary.get("bwt", {}).get(trainer)
    out["old_kept"] = (summary.get("at_a_glance") or {}).get(trainer, {}).get("old_kept")
    return {k: (float(v) if v is not None else float("nan")) for k, v in out.items()}


def _mean_std(values: Sequence[float]) -> (float, float, int):
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def aggregate_seeds(summaries: Dict[int, dict], wall_s: Dict[int, float]) -> dict:
    """Mean +- sample std over seeds of every trainer's final figures (:data:`FIGURES`)."""
    trainers = list(dict.fromkeys(t for s in summaries.values() for t in s["mean_dice"]))
    table = {}
    for t in trainers:
        per_seed = {seed: _final(s, t) for seed, s in summaries.items() if t in s["mean_dice"]}
        table[t] = {f: dict(zip(("mean", "std", "n"), _mean_std([v[f] for v in per_seed.values()])))
                    for f in FIGURES}
        table[t]["per_seed"] = per_seed
    return {"seeds": sorted(summaries), "trainers": table, "wall_s": wall_s,
            "joint_trainer": next((s.get("joint_trainer") for s in summaries.values()), None)}


def paired_differences(agg: dict, reference: str) -> Dict[str, Dict[str, dict]]:
    """``reference`` minus every other continual trainer, seed by seed, for :data:`COMPARE_FIGURES`.

    Within a seed every trainer starts from the same phantom, patient split and step-0 model, so the per-seed
    difference removes what the seeds share; its mean +- sample std over seeds is set against the seed-to-seed
    spread (sample std) of the two trainers' own figures. Returns ``{other: {figure: {"mean", "std", "n",
    "higher", "spread"}}}``, where ``higher`` counts the seeds in which ``reference`` is higher and ``spread`` is the
    larger of the two trainers' std over seeds.
    """
    rows = agg["trainers"]
    if reference not in rows:
        return {}
    ref = rows[reference]["per_seed"]
    out = {}
    for other, row in rows.items():
        if other in (reference, agg.get("joint_trainer")):
            continue
        out[other] = {}
        for f in COMPARE_FIGURES:
            diffs = [ref[s][f] - row["per_seed"][s][f] for s in ref if s in row["per_seed"]]
            diffs = [d for d in diffs if not math.isnan(d)]
            m, sd, n = _mean_std(diffs)
            spread = max(rows[reference][f]["std"], row[f]["std"])
            out[other][f] = {"mean": m, "std": sd, "n": n, "higher": sum(d > 0 for d in diffs), "spread": spread}
    return out


def seeds_markdown(agg: dict, compare: Optional[str] = None) -> str:
    """The multi-seed table; with ``compare``, also ``compare`` minus every other trainer, paired by seed."""
    def cell(d):
        return "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.3f} +- {d['std']:.3f}"
    lines = [f"Seeds {agg['seeds']}; mean +- sample std over seeds of the final step (NaN seeds left out). "
             "old kept = final old-class Dice / the joint model's Dice on the same classes.", "",
             "| trainer | old | new | all | mean forgetting | BWT | old kept |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, row in agg["trainers"].items():
        name = f"{t} (joint, upper bound)" if t == agg.get("joint_trainer") else t
        lines.append(f"| {name} | " + " | ".join(cell(row[f]) for f in FIGURES) + " |")
    walls = [f"seed {k}: {v / 60:.1f} min" if v is not None else f"seed {k}: not recorded"
             for k, v in sorted(agg["wall_s"].items())]
    lines += ["", "Wall time per seed: " + ", ".join(walls)]
    diffs = paired_differences(agg, compare) if compare else {}
    if diffs:
        n = len(agg["seeds"])
        lines += ["", f"{compare} minus each trainer, paired by seed (same phantom, split and step-0 model): mean +- "
                  f"sample std of the per-seed difference; [k/{n}] = seeds in which {compare} is higher; spread = "
                  "the larger of the two trainers' std over seeds.", "",
                  "| trainer | old (spread) | new (spread) | all (spread) |", "| --- | --- | --- | --- |"]
        for other, figs in diffs.items():
            cells = [f"{d['mean']:+.3f} +- {d['std']:.3f} [{d['higher']}/{d['n']}] ({d['spread']:.3f})"
                     if d["n"] else "n/a" for d in (figs[f] for f in COMPARE_FIGURES)]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _existing_seeds(output: str, seeds: Sequence[int]) -> (Dict[int, dict], Dict[int, Optional[float]]):
    """The summaries of finished seeds in ``output`` and their wall times from an earlier seeds_summary.json."""
    earlier = os.path.join(output, "seeds_summary.json")
    walls_before = {}
    if os.path.isfile(earlier):
        with open(earlier) as f:
            walls_before = json.load(f).get("wall_s", {})
    summaries, walls = {}, {}
    for seed in seeds:
        path = os.path.join(output, f"seed_{int(seed)}", "summary.json")
        if not os.path.isfile(path):
            raise CIMISError(f"--aggregate-only: {path} does not exist; run that seed first or leave it out of "
                             "--seeds.")
        with open(path) as f:
            summaries[seed] = json.load(f)
        walls[seed] = walls_before.get(str(seed))
    return summaries, walls


@cli_entry
def main(argv=None):
    from nnunetv2_cimis.demo import Clock, run_demo, train_scenario
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--trainers", nargs="+", default=None, help="default: every continual trainer")
    p.add_argument("--dataset", "-d", default=None, help="a step dataset of an existing scenario (default: phantom)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--kind", default="abdominal3d", help="phantom of the default scenario (abdominal3d, "
                                                           "laparoscopic2d)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="phantom seeds of the default scenario")
    p.add_argument("--cases", type=int, default=None, help="phantom cases (default: the demo's)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default: the demo's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each incremental step (default: the demo's)")
    p.add_argument("--epochs-step0", type=int, default=None)
    p.add_argument("--epochs-joint", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="initial lr of incremental steps (nnUNet_cimis_lr)")
    p.add_argument("--features-per-stage", type=int, nargs="+", default=None,
                   help="phantom scenario: network width per encoder stage (default: the demo's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--skip-step0", action="store_true", help="step 0 is already trained (nnUNetTrainerFT)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compare", default="nnUNetTrainerPGCDDAPD",
                   help="phantom scenario: the trainer set against every other one, paired by seed "
                        "(default: %(default)s; '' for none)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="phantom scenario: train nothing; aggregate the seed_<S>/summary.json already in --output "
                        "(wall times from an earlier seeds_summary.json there, if any)")
    a = p.parse_args(argv)
    if a.dataset is None:
        if a.aggregate_only:
            summaries, walls = _existing_seeds(a.output, a.seeds)
        else:
            summaries, walls = {}, {}
            for seed in a.seeds:
                t0 = time.time()
                summaries[seed] = run_demo(os.path.join(a.output, f"seed_{seed}"), a.trainers or ["all"], a.kind,
                                           a.cases, a.epochs, a.epochs_step0, a.iterations, a.epochs_joint, a.jobs,
                                           seed=seed, overwrite=True, lr=a.lr, features=a.features_per_stage)
                walls[seed] = time.time() - t0
        result = aggregate_seeds(summaries, walls)
        os.makedirs(a.output, exist_ok=True)
        with open(os.path.join(a.output, "seeds_summary.json"), "w") as f:
            json.dump(result, f, indent=2, default=lambda v: None)
        md = seeds_markdown(result, a.compare or None)
        with open(os.path.join(a.output, "seeds_table.md"), "w") as f:
            f.write(md)
        print(md)
    else:
        from nnunetv2_cimis.trainer_folder import ensure_trainer_path
        from nnunetv2_cimis.evaluation.evaluate import evaluate_scenario
        from nnunetv2_cimis.nnunet_folders import dataset_name, require_env
        from nnunetv2_cimis.scenarios.step_metadata import read_step_info
        from nnunetv2_cimis.training.registry import continual_trainers
        ensure_trainer_path()
        name = dataset_name(a.dataset)
        with open(os.path.join(require_env("nnUNet_raw"), name, "dataset.json")) as f:
            info = read_step_info(json.load(f), name)
        trainers = a.trainers or continual_trainers(3 if a.configuration.startswith("3d") else 2)
        env = {"nnUNet_cimis_epochs": str(a.epochs or 2), "nnUNet_cimis_iterations": str(a.iterations or 100),
               "OMP_WAIT_POLICY": "PASSIVE", **({"nnUNet_cimis_lr": str(a.lr)} if a.lr else {})}
        log_dir = os.path.join(os.path.abspath(a.output), "logs")
        os.makedirs(log_dir, exist_ok=True)
        train_scenario(info.step_datasets, info.joint_dataset, a.configuration, a.plans, trainers, env, log_dir,
                       Clock(), a.epochs_step0 or 6, a.epochs_joint or 6, a.jobs, not a.skip_step0, a.device)
        result = evaluate_scenario(name, a.configuration, a.plans, 0, trainers, a.output, num_processes=0,
                                   use_mirroring=False)  # as measured in docs/benchmarks.md
        print(result["markdown"])
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

"""GPU check: what the CPU cannot measure, in one command of at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py --output gpu_check_output      # one CUDA GPU, nnU-Net's default plan
    python benchmarks/gpu_check.py --output /tmp/gpu_smoke --smoke  # the same code path on CPU at tiny size

1. Builds a realistic phantom (128^3 voxels at 1.5 mm), a 3-step scenario ("2-2-2") planned by nnU-Net on step 0
   with its default 3d_fullres plan unchanged (network, batch and patch size; AMP is on with CUDA), and trains
   step 0 with ``nnUNetTrainerFT`` (the teacher of every method).
2. Overhead: time per training iteration and peak CUDA memory of every continual trainer of the 3D registry
   relative to plain ``nnUNetTrainer`` on step 1, each in a fresh process (``benchmarks/overhead.py``), printing
   ``NAME time_ratio=X.XX memory_ratio=Y.YY``.
3. Continual: steps 1 and 2 of FT, MiB and PGCD+DAPD and the joint model, with the demo's training helpers,
   then the continual evaluation of the held-out test cases (``evaluate_scenario``) and its table.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--output`` (``work/``: the scenario, rebuilt on every run;
``continual/``: the evaluation's report).

Time budget (default 480 s), estimated from nnU-Net's known speed of about 0.1-0.2 s per iteration for the
default 3d_fullres network at a 128^3 patch on an H100 with AMP, plus about 20-30 s of start-up, final
validation and step memory per ``nnUNetv2_train`` run (not measured on a GPU yet):

============================================  =========================================================
phantom (12 cases) + planning, preprocessing  about 60 s (CPU)
step 0 (150 iterations) next to the joint     about 30 s + 210 x 0.25 s (two runs share the GPU) = 85 s
model (210 iterations)
overhead, 10 trainers in fresh processes      10 x (about 12 s start-up + 13 iterations) + MOSInv's synthesis
                                              = about 150 s
continual: 3 chains of 2 x 60 iterations,     about 2 x (30 s + 60 x 0.25 s x 1.4 teacher x 1.5) = 125 s
the three run together
evaluation: 8 models x 2-3 test cases         about 30-45 s (the evaluation reserve, 45 s)
total                                         about 465 s: the time guard trims the last runs to keep 480
============================================  =========================================================

The time guard: the overhead part measures FT, MiB and PGCD+DAPD (the continual part's trainers) always and
every other trainer only while the continual part's estimate still fits; a training run of the continual part
starts only if its estimate (from the measured step-0 run: start-up cost + iterations x measured seconds per
iteration x 1.4 for the teacher x (runs sharing the device / 2), times a safety factor 1.25) ends before the
budget minus the evaluation reserve. Whatever is left out is listed on the console, in the JSON
(``overhead_skipped``, ``continual.skipped_runs``) and in the Markdown; the table shows the steps that were
trained. The steps are short (the check measures cost and proves the path at GPU scale): the report's bounds
WARNING says when the models are under-trained.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  (benchmarks/overhead.py)

CONFIGURATION = "3d_fullres"
STEP0_TRAINER = "nnUNetTrainerFT"
JOINT_TRAINER = "nnUNetTrainerJoint"
CONTINUAL = ["nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerPGCDDAPD"]
SOURCE_ID, FIRST_STEP_ID = 870, 871
TEACHER_FACTOR = 1.4   # an incremental step runs the teacher too (CPU time ratios of MiB 1.18, PGCD+DAPD 1.36)
SAFETY = 1.25          # estimates are multiplied by this before the guard compares them with the time left
PROFILES = {
    # GPU: nnU-Net's default plan of a 128^3 phantom at 1.5 mm
    "gpu": {"device": "cuda", "shape": 128, "spacing": 1.5, "cases": 12, "features": None, "plans": "nnUNetPlans",
            "iterations_per_epoch": 30, "epochs_step0": 5, "epochs_joint": 7, "epochs_step": 2,
            "val_iterations": 2, "overhead_iterations": 10, "overhead_warmup": 3, "jobs": 3,
            "budget": 480.0, "eval_reserve": 45.0, "overhead_trainers": None},
    # CPU smoke test: the same code path at tiny size (small network, a few iterations, three trainers measured)
    "smoke": {"device": "cpu", "shape": 32, "spacing": 1.5, "cases": 13, "features": [4, 8, 16, 32],
              "plans": "nnUNetPlansGpuCheckSmoke", "iterations_per_epoch": 2, "epochs_step0": 1, "epochs_joint": 1,
              "epochs_step": 1, "val_iterations": 1, "overhead_iterations": 2, "overhead_warmup": 1, "jobs": 3,
              "budget": 180.0, "eval_reserve": 15.0, "overhead_trainers": CONTINUAL},
}


class TimeGuard:
    """Start work only if its estimate ends before ``start + budget - reserve``."""

    def __init__(self, budget: float, reserve: float):
        self.start = time.time()
        self.budget = budget
        self.deadline = self.start + budget - reserve
        self.skipped = []
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.time() - self.start

    def skip(self, what: str) -> None:
        with self._lock:
            self.skipped.append(what)

    def allows(self, estimate: float, what: str) -> bool:
        with self._lock:
            if time.time() + SAFETY * estimate <= self.deadline:
                return True
            self.skipped.append(what)
            log(f"time guard: not starting {what} (estimated {SAFETY * estimate:.0f} s, "
                f"{max(0.0, self.deadline - time.time()):.0f} s left before the evaluation reserve)")
            return False


_T0 = time.time()


def log(message: str) -> None:
    t = int(time.time() - _T0)
    print(f"[{t // 60:02d}:{t % 60:02d}] {message}", flush=True)


def epoch_seconds(log_file: str) -> float:
    """Sum of nnU-Net's "Epoch time: X s" lines in a training log (the training iterations, without start-up)."""
    with open(log_file) as f:
        return sum(float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", f.read()))


def plan_summary(preprocessed: str, dataset: str, plans: str) -> dict:
    """The configuration nnU-Net planned: patch, batch, spacing, network stages and widths."""
    with open(os.path.join(preprocessed, dataset, plans + ".json")) as f:
        cfg = json.load(f)["configurations"][CONFIGURATION]
    arch = cfg.get("architecture", {}).get("arch_kwargs", {})
    return {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
            "features_per_stage": arch.get("features_per_stage"), "n_stages": arch.get("n_stages"),
            "network": cfg.get("architecture", {}).get("network_class_name")}


def device_info(device: str) -> dict:
    import torch
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        from importlib.metadata import version
        info["nnunetv2"] = version("nnunetv2")
    except Exception:  # noqa: BLE001 - informative only
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def prepare(work: str, p: dict) -> dict:
    """Fresh work folder: phantom, scenario (nnU-Net plans on step 0), environment. Returns the scenario summary
    plus ``env``."""
    from nnunetv2_cimis.demo import FINGERPRINT_SAMPLES, demo_environment
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    if os.path.isdir(work):
        shutil.rmtree(work)  # one run, one scenario: never a stale folder
    env = demo_environment(work, p["epochs_step"], p["iterations_per_epoch"])
    env["nnUNet_cimis_val_iterations"] = str(p["val_iterations"])
    if p["device"] == "cuda":
        cpus = os.cpu_count() or 4
        env["nnUNet_n_proc_DA"] = str(max(2, min(12, cpus // p["jobs"])))  # augmentation must keep up with a GPU
        env["nnUNet_def_n_proc"] = str(max(1, min(4, cpus // p["jobs"])))
    else:
        env["OMP_NUM_THREADS"] = "1"
    os.environ.update(env)
    overhead.use_demo_hyperparameters(work)
    env["nnUNet_cimis_hparams"] = os.environ["nnUNet_cimis_hparams"]
    shape = (p["shape"],) * 3
    log(f"writing {p['cases']} phantom cases of {p['shape']}^3 voxels at {p['spacing']} mm")
    write_abdominal_phantom(env["nnUNet_raw"], SOURCE_ID, p["cases"], shape=shape, spacing=(p["spacing"],) * 3,
                            seed=0)
    log("making the 2-2-2 scenario: nnU-Net plans step 0, plans moved, every step preprocessed")
    nproc = 1 if p["device"] == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
    with contextlib.redirect_stdout(io.StringIO()):
        summary = make_scenario(str(SOURCE_ID), "2-2-2", [FIRST_STEP_ID + i for i in range(3)], seed=0,
                                configuration=CONFIGURATION, plans_name=p["plans"],
                                features_per_stage=p["features"], step0_trainer=STEP0_TRAINER,
                                num_processes=nproc, fingerprint_samples=FINGERPRINT_SAMPLES)
    summary["env"] = env
    return summary


def train(dataset: str, trainer: str, epochs: int, env: dict, log_dir: str, p: dict, runs: list) -> dict:
    """One ``nnUNetv2_train`` run (the demo's helper); its record (wall and training seconds) is appended to
    ``runs`` and returned."""
    from nnunetv2_cimis.demo import Clock, run_training
    clock = Clock()
    clock.start = _T0  # the demo's helper logs "[mm:ss] trained ..." on this check's clock
    seconds = run_training(dataset, CONFIGURATION, trainer, env, log_dir, clock, epochs, p["plans"], p["device"])
    log_file = os.path.join(log_dir, f"{dataset}__{trainer}.log")
    record = {"dataset": dataset, "trainer": trainer, "iterations": epochs * p["iterations_per_epoch"],
              "seconds": round(seconds, 1), "training_seconds": round(epoch_seconds(log_file), 1)}
    runs.append(record)
    return record


def train_or_record(dataset: str, trainer: str, epochs: int, env: dict, log_dir: str, p: dict, runs: list,
                    failed: list) -> bool:
    """:func:`train`, but a failed run is recorded in ``failed`` (with its log's tail) instead of ending the check:
    the other runs and the overhead figures still get written. Returns whether the run succeeded."""
    try:
        train(dataset, trainer, epochs, env, log_dir, p, runs)
        return True
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the rest of the check
        failed.append({"run": f"{trainer} on {dataset}", "error": f"{type(e).__name__}: {e}"[-3000:]})
        log(f"FAILED: {trainer} on {dataset}: {type(e).__name__}: {str(e)[-1500:]}")
        return False


def step_estimate(p: dict, cost: dict) -> float:
    """Seconds of one incremental step run: the step-0 run's start-up/validation cost plus the step's iterations at
    the step-0 run's measured seconds per iteration times the teacher's cost, scaled by the runs sharing the
    device (``jobs``; step 0 was measured sharing it with the joint run, i.e. 2 at a time). The start-up cost is
    not scaled: measured on the 2-core CPU, runs three at a time took as long as two at a time (86-102 s vs
    94-95 s)."""
    iterations = p["epochs_step"] * p["iterations_per_epoch"]
    return cost["fixed_seconds"] + iterations * cost["seconds_per_iteration"] * TEACHER_FACTOR * max(
        1.0, p["jobs"] / 2)


def continual_estimate(p: dict, cost: dict) -> float:
    """Seconds of the whole continual part: two steps per chain, ``jobs`` chains at a time."""
    rounds = 2 * math.ceil(len(CONTINUAL) / max(1, p["jobs"]))
    return rounds * step_estimate(p, cost)


def run_continual(summary: dict, p: dict, guard: TimeGuard, log_dir: str, runs: list, cost: dict,
                  failed: list = None) -> None:
    """The chains of steps 1 and 2 of the continual trainers, ``jobs`` runs at a time, each run started only if
    the time guard allows it (a chain stops at its first refused step)."""
    steps, env = summary["step_datasets"], summary["env"]
    estimate = step_estimate(p, cost)

    def chain(trainer: str) -> None:
        for i, d in enumerate(steps[1:], start=1):
            if not guard.allows(estimate, f"{trainer} on {d}"):
                for later in steps[i + 1:]:  # its teacher (this step) is missing: the rest of the chain is left out
                    guard.skip(f"{trainer} on {later}")
                return
            if not train_or_record(d, trainer, p["epochs_step"], env, log_dir, p, runs,
                                   failed if failed is not None else []):
                return  # the next step has no teacher

    with ThreadPoolExecutor(max_workers=p["jobs"]) as pool:
        for f in [pool.submit(chain, t) for t in CONTINUAL]:
            f.result()


def _finite(o):
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def markdown(result: dict) -> str:
    s = result["settings"]
    out = ["# GPU check", "",
           f"Mode `{result['mode']}`, device `{result['device']['device']}`"
           + (f" ({result['device'].get('gpu')}, {result['device'].get('gpu_memory_gb')} GB)"
              if result["device"].get("gpu") else "")
           + f", torch {result['device']['torch']}, nnunetv2 {result['device'].get('nnunetv2', '?')}; "
           f"total {result['timings']['total']:.0f} s of a {s['budget']:.0f} s budget.", "",
           f"Phantom {s['cases']} cases of {s['shape']}^3 at {s['spacing']} mm; plan `{s['plans']}`: "
           f"patch {result['plan']['patch_size']}, batch {result['plan']['batch_size']}, spacing "
           f"{result['plan']['spacing']}, features {result['plan']['features_per_stage']}.", "",
           "## Overhead relative to nnUNetTrainer", "",
           f"{s['overhead_iterations']} timed iterations after {s['overhead_warmup']} warm-up ones, each trainer in a "
           "fresh process; memory = peak `torch.cuda.max_memory_allocated` on CUDA (CPU: growth of peak resident "
           "memory).", "",
           "| trainer | time_ratio | memory_ratio | s/it | memory MB | parameters |",
           "| --- | --- | --- | --- | --- | --- |"]
    for t, r in result["overhead"].items():
        out.append(f"| {t} | {r['time_ratio']:.2f} | {r['memory_ratio']:.2f} | {r['seconds_per_iteration']:.3f} | "
                   f"{r['memory_mb']:.0f} | {r['parameters']} |")
    if result["overhead_skipped"]:
        out += ["", f"Not measured (time guard): {', '.join(result['overhead_skipped'])}."]
    if result["overhead_failed"]:
        out += ["", f"FAILED: {', '.join(result['overhead_failed'])} (see the console output)."]
    c = result["continual"]
    out += ["", "## Continual run (3 steps)", "",
            f"Step 0 {c['iterations']['step0']} iterations ({STEP0_TRAINER}), joint {c['iterations']['joint']}, "
            f"steps 1 and 2 {c['iterations']['step']} each; trainers {', '.join(CONTINUAL)}.", "",
            "| dataset | trainer | iterations | wall s | training s |", "| --- | --- | --- | --- | --- |"]
    for r in c["runs"]:
        out.append(f"| {r['dataset']} | {r['trainer']} | {r['iterations']} | {r['seconds']} | "
                   f"{r['training_seconds']} |")
    for r in c.get("failed_runs", []):
        out += ["", f"**FAILED**: {r['run']}: `{r['error'][-500:]}`"]
    if c["stopped_by_time_guard"]:
        out += ["", f"**The time guard stopped the continual part**: not trained: {', '.join(c['skipped_runs'])}."]
    out += ["", c.get("report_markdown") or f"No evaluation: {c.get('evaluation_error')}"]
    return "\n".join(out) + "\n"


def run(output: str, smoke: bool = False, budget: float = None, overhead_trainers=None) -> dict:
    from nnunetv2_cimis.training.registry import continual_trainers
    p = dict(PROFILES["smoke" if smoke else "gpu"])
    if budget is not None:
        p["budget"] = float(budget)
    if p["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; run on a GPU machine, or use --smoke for the CPU smoke test")
    guard = TimeGuard(p["budget"], p["eval_reserve"])
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    work = os.path.join(output, "work")
    log_dir = os.path.join(output, "logs")
    if os.path.isdir(log_dir):
        shutil.rmtree(log_dir)
    os.makedirs(log_dir)
    timings = {}
    summary = prepare(work, p)
    steps = summary["step_datasets"]
    env = summary["env"]
    plan = plan_summary(env["nnUNet_preprocessed"], steps[0], p["plans"])
    log(f"plan {p['plans']}: patch {plan['patch_size']}, batch {plan['batch_size']}, spacing {plan['spacing']}, "
        f"features {plan['features_per_stage']}")
    timings["prepare"] = guard.elapsed()

    runs, failed_runs = [], []
    # step 0 (the teacher of every method) and the joint model, side by side
    log(f"training step 0 ({STEP0_TRAINER}) and the joint model ({JOINT_TRAINER}) side by side")
    with ThreadPoolExecutor(max_workers=1) as pool:
        joint_future = pool.submit(train_or_record, summary["joint_dataset"], JOINT_TRAINER, p["epochs_joint"], env,
                                   log_dir, p, runs, failed_runs)
        step0_run = train(steps[0], STEP0_TRAINER, p["epochs_step0"], env, log_dir, p, runs)
        joint_future.result()
    it0 = p["epochs_step0"] * p["iterations_per_epoch"]
    seconds = step0_run["seconds"]
    training = min(seconds, step0_run["training_seconds"] or seconds)
    cost = {"seconds_per_iteration": training / it0, "fixed_seconds": max(0.0, seconds - training)}
    timings["step0_and_joint"] = guard.elapsed() - timings["prepare"]

    t0 = guard.elapsed()
    trainers = overhead_trainers or p["overhead_trainers"] or continual_trainers(3)
    # the trainers of the continual part first, always measured; then PLOP and the others while the time allows,
    # leaving the continual part the time its estimate asks for
    first = CONTINUAL + ["nnUNetTrainerPLOP"]
    trainers = [t for t in first if t in trainers] + [t for t in trainers if t not in first]
    log(f"overhead of {len(trainers)} trainers relative to {overhead.BASELINE} on {steps[1]}; step-0 run: "
        f"{cost['fixed_seconds']:.0f} s start-up and validation, {cost['seconds_per_iteration']:.3f} s/it; "
        f"continual part estimated at {continual_estimate(p, cost):.0f} s")
    results, skipped, failed = overhead.measure(steps[1], p["plans"], trainers, p["overhead_iterations"],
                                                p["overhead_warmup"], p["device"],
                                                deadline=guard.deadline - SAFETY * continual_estimate(p, cost),
                                                log=lambda m: print(m, flush=True), always=CONTINUAL)
    timings["overhead"] = guard.elapsed() - t0

    t0 = guard.elapsed()
    log(f"continual run: steps 1 and 2 of {', '.join(CONTINUAL)}, {p['jobs']} runs at a time")
    run_continual(summary, p, guard, log_dir, runs, cost, failed_runs)
    timings["continual_training"] = guard.elapsed() - t0

    t0 = guard.elapsed()
    continual = {"trainers": CONTINUAL, "joint_trainer": JOINT_TRAINER, "runs": runs,
                 "iterations": {"step0": it0, "joint": p["epochs_joint"] * p["iterations_per_epoch"],
                                "step": p["epochs_step"] * p["iterations_per_epoch"]},
                 "skipped_runs": list(guard.skipped), "stopped_by_time_guard": bool(guard.skipped),
                 "failed_runs": failed_runs}
    try:
        import torch
        from nnunetv2_cimis.evaluation.evaluate import evaluate_scenario
        ev = evaluate_scenario(steps[0], CONFIGURATION, p["plans"], 0, CONTINUAL, os.path.join(output, "continual"),
                               num_processes=0, device=torch.device(p["device"]),
                               use_mirroring=False)  # as budgeted (mirroring is 8x the prediction time in 3D)
        continual.update({"report_markdown": ev["markdown"], "mean_dice": ev["mean_dice"],
                          "per_class_dice": ev["per_class_dice"], "mean_forgetting": ev["mean_forgetting"],
                          "bwt": ev["bwt"], "at_a_glance_lines": ev.get("at_a_glance_lines"),
                          "bounds_warning": (ev.get("bounds") or {}).get("warning")})
    except Exception as e:  # noqa: BLE001 - the overhead figures must still be written
        continual["evaluation_error"] = f"{type(e).__name__}: {e}"
        log(f"evaluation failed: {continual['evaluation_error']}")
    timings["evaluation"] = guard.elapsed() - t0
    timings["total"] = guard.elapsed()
    if guard.skipped:
        log("the time guard stopped the continual part: not trained: " + ", ".join(guard.skipped))

    result = {"mode": "smoke" if smoke else "gpu", "device": device_info(p["device"]), "settings": p, "plan": plan,
              "step_datasets": steps, "joint_dataset": summary["joint_dataset"],
              "overhead": results, "overhead_skipped": skipped, "overhead_failed": failed,
              "continual": continual, "timings": {k: round(v, 1) for k, v in timings.items()},
              "within_budget": timings["total"] <= p["budget"]}
    with open(os.path.join(output, "gpu_check.json"), "w") as f:
        json.dump(_finite(result), f, indent=2, default=str)
    with open(os.path.join(output, "gpu_check.md"), "w") as f:
        f.write(markdown(result))
    log(f"done in {timings['total']:.0f} s (budget {p['budget']:.0f} s); wrote {output}/gpu_check.json and "
        f"gpu_check.md")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", "-o", default="gpu_check_output")
    ap.add_argument("--smoke", action="store_true", help="CPU, 32^3, small network, a few iterations")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 480 on the GPU, 180 for --smoke)")
    ap.add_argument("--trainers", nargs="+", default=None,
                    help="trainers of the overhead part (default: every continual trainer of the 3D registry; "
                         "--smoke: FT, MiB, PGCD+DAPD)")
    a = ap.parse_args(argv)
    result = run(a.output, a.smoke, a.budget, a.trainers)
    ok = overhead.BASELINE in result["overhead"] and not result["overhead_failed"] \
        and "evaluation_error" not in result["continual"] and not result["continual"]["failed_runs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

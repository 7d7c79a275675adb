"""Time per training iteration and peak memory of trainers, as ratios to ``nnUNetTrainer``.

All trainers run on the same preprocessed step (step 1 of a phantom scenario, whose step 0 is trained for a
few iterations to serve as teacher), each in a fresh process, for ``--iterations`` timed training iterations
after ``--warmup`` untimed ones. Only ``train_step`` is timed (the batch is drawn before the clock starts), so
data loading, identical for all, does not dilute the ratios. Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed iterations; on CPU the growth of the process's peak
resident memory from just before the trainer is set up (network, teacher, optimizer, data) to the end.
Prints one line per trainer: ``NAME time_ratio=X.XX memory_ratio=Y.YY`` (plus absolute figures and
``cpu_time_ratio``: the same ratio of the process's CPU time over the timed ``train_step`` calls,
``time.process_time``; on a CPU shared with other jobs the wall-clock ratio mostly measures the contention,
the CPU-time ratio much less so; with ``OMP_NUM_THREADS=1`` it is the work done).

    python benchmarks/overhead.py --trainers nnUNetTrainer nnUNetTrainerPGCDDAPD --iterations 20
    python benchmarks/overhead.py --trainers nnUNetTrainerMiB --device cuda --default-network --shape 128
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

BASELINE = "nnUNetTrainer"
CONFIGURATION = "3d_fullres"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(dataset: str, plans: str, trainer_name: str, iterations: int, warmup: int, device: str) -> dict:
    """Measure one trainer in this process (called in a subprocess by :func:`main`)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    torch.manual_seed(0)
    dev = torch.device(device)
    recursive_find_trainer_class_by_name(trainer_name)  # imports done before the memory baseline
    baseline_rss = _rss_mb()
    trainer = get_trainer_from_args(dataset, CONFIGURATION, 0, trainer_name, plans, device=dev)
    trainer.num_iterations_per_epoch = iterations + warmup
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    for _ in range(warmup):
        trainer.train_step(next(trainer.dataloader_train))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elapsed = cpu = 0.0
    for _ in range(iterations):
        batch = next(trainer.dataloader_train)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
    memory = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
              else _peak_rss_mb() - baseline_rss)
    for loader in (trainer.dataloader_train, trainer.dataloader_val):  # augmentation workers (nnUNet_n_proc_DA > 0)
        if hasattr(loader, "_finish"):
            loader._finish()
    return {"trainer": trainer_name, "seconds_per_iteration": elapsed / iterations,
            "cpu_seconds_per_iteration": cpu / iterations, "memory_mb": memory,
            "parameters": sum(p.numel() for p in trainer.network.parameters())}


STEP0_TRAINER = "nnUNetTrainerFT"


def settings_key(shape: int, default_network: bool, cases: int) -> str:
    """Name of the work sub-folder of one set of preparation settings."""
    return f"shape{shape}_{'default' if default_network else 'small'}_network_{cases}cases"


def prepared_ok(env: dict, marker: dict, settings: dict) -> bool:
    """True when a prepared work folder matches ``settings`` and holds what the workers need: the plans of the
    measured step and the step-0 teacher's checkpoint."""
    if marker.get("settings") != settings:
        return False
    plans = settings["plans"]
    return (os.path.isfile(os.path.join(env["nnUNet_preprocessed"], marker["dataset"], plans + ".json"))
            and os.path.isfile(os.path.join(env["nnUNet_results"], marker["step0"],
                                            f"{STEP0_TRAINER}__{plans}__{CONFIGURATION}", "fold_0",
                                            "checkpoint_final.pth")))


def prepare(workdir: str, shape: int, default_network: bool, cases: int, device: str) -> str:
    """Phantom scenario with step 0 trained briefly (the teacher); returns the step-1 dataset name.

    The scenario lives in ``workdir/<settings_key>``: a folder is reused only when it was made with the same
    settings and is complete; otherwise it is rebuilt from scratch (an earlier run with other settings, e.g. the
    small network, or an interrupted one, left a stale folder without the plans this run needs).
    """
    from nnunetv2_cimis.demo import FINGERPRINT_SAMPLES, Clock, demo_environment, run_training
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    work = os.path.join(workdir, settings_key(shape, default_network, cases))
    settings = {"shape": shape, "default_network": default_network, "cases": cases,
                "plans": plans_name(default_network)}
    marker_path = os.path.join(work, "prepared.json")
    env = demo_environment(work, 1, 2)
    env.pop("OMP_WAIT_POLICY")  # one run at a time here
    os.environ.update(env)
    if os.path.isfile(marker_path):
        with open(marker_path) as f:
            marker = json.load(f)
        if prepared_ok(env, marker, settings):
            return marker["dataset"]
        print(f"rebuilding the stale work folder {work}", file=sys.stderr)
    if os.path.isdir(os.path.join(work, "nnunet")):
        shutil.rmtree(os.path.join(work, "nnunet"))
    if os.path.isfile(marker_path):
        os.remove(marker_path)
    env = demo_environment(work, 1, 2)
    env.pop("OMP_WAIT_POLICY")
    write_abdominal_phantom(env["nnUNet_raw"], 800, cases, shape=(shape,) * 3, seed=0, overwrite=True)
    features = None if default_network else (8, 16, 32, 64, 128, 256)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        summary = make_scenario("800", "2-2-2", [801, 802, 803], configuration=CONFIGURATION,
                                plans_name=plans_name(default_network), features_per_stage=features,
                                fingerprint_samples=FINGERPRINT_SAMPLES)
    run_training(summary["step_datasets"][0], CONFIGURATION, STEP0_TRAINER, env, work, Clock(), 2,
                 plans_name(default_network), device)
    with open(marker_path, "w") as f:
        json.dump({"dataset": summary["step_datasets"][1], "step0": summary["step_datasets"][0],
                   "settings": settings}, f)
    return summary["step_datasets"][1]


def use_demo_hyperparameters(workdir: str) -> None:
    """Synthesis-based methods synthesise their replay set when a step starts: give them the demo's short
    settings (``nnUNet_cimis_hparams``) so that set-up stays short; the timed iterations are the same either way.
    An ``nnUNet_cimis_hparams`` already set is kept."""
    if os.environ.get("nnUNet_cimis_hparams"):
        return
    from nnunetv2_cimis.demo import DEMO_HYPERPARAMETERS
    path = os.path.join(workdir, "hparams.json")
    with open(path, "w") as f:
        json.dump(DEMO_HYPERPARAMETERS, f)
    os.environ["nnUNet_cimis_hparams"] = path


def measure(dataset: str, plans: str, trainers, iterations: int, warmup: int, device: str,
            deadline: float = None, log=print, always=()):
    """Measure ``nnUNetTrainer`` and ``trainers``, each in a fresh process (:func:`worker`), on ``dataset``
    (nnU-Net's folders from ``os.environ``). Prints one line per trainer ``NAME time_ratio=X.XX
    memory_ratio=Y.YY (...)``.

    ``deadline`` (a ``time.time()`` value): a trainer (other than the baseline and those in ``always``) is not
    started when the longest measurement so far would not end before it. Returns ``(results, skipped, failed)``: results by trainer (with ``time_ratio`` and
    ``memory_ratio``), the trainers left out by the deadline, the trainers whose worker failed.
    """
    trainers = [BASELINE] + [t for t in trainers if t != BASELINE]
    results, skipped, failed = {}, [], []
    longest = 0.0
    for t in trainers:
        if deadline is not None and t != BASELINE and t not in always and time.time() + longest > deadline:
            skipped.append(t)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", t, "--dataset", dataset, "--plans", plans,
               "--trainers", t, "--iterations", str(iterations), "--warmup", str(warmup), "--device", device]
        t0 = time.time()
        proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
        longest = max(longest, time.time() - t0)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{t} FAILED\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr)
            failed.append(t)
            continue
        results[t] = json.loads(line[0][7:])
        results[t]["wall_seconds"] = time.time() - t0
    base = results.get(BASELINE)
    if base is None:
        return results, skipped, failed
    log(f"# device={device} iterations={iterations} dataset={dataset} plans={plans} baseline: "
        f"{base['seconds_per_iteration']:.3f} s/it, {base['memory_mb']:.0f} MB, {base['parameters']} parameters")
    for t in trainers:
        if t not in results:
            continue
        r = results[t]
        r["time_ratio"] = r["seconds_per_iteration"] / base["seconds_per_iteration"]
        r["memory_ratio"] = r["memory_mb"] / base["memory_mb"] if base["memory_mb"] > 0 else float("nan")
        r["cpu_time_ratio"] = r["cpu_seconds_per_iteration"] / base["cpu_seconds_per_iteration"]
        log(f"{t} time_ratio={r['time_ratio']:.2f} memory_ratio={r['memory_ratio']:.2f} "
            f"({r['seconds_per_iteration']:.3f} s/it, {r['memory_mb']:.0f} MB, {r['parameters']} parameters; "
            f"cpu_time_ratio={r['cpu_time_ratio']:.2f}, {r['cpu_seconds_per_iteration']:.3f} CPU s/it)")
    if skipped:
        log(f"# not measured (time guard): {' '.join(skipped)}")
    return results, skipped, failed


def plans_name(default_network: bool) -> str:
    return "nnUNetPlans" if default_network else "nnUNetPlansSmall"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", required=True)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join("benchmarks", "_work", "overhead"))
    p.add_argument("--shape", type=int, default=32, help="phantom edge length (cube); the plans pick the patch")
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--default-network", action="store_true",
                   help="nnU-Net's planned network unchanged (default: a smaller network for CPU)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plans", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.dataset, a.plans or plans_name(a.default_network), a.worker,
                                            a.iterations, a.warmup, a.device)))
        return
    workdir = os.path.abspath(a.workdir)
    os.makedirs(workdir, exist_ok=True)
    if a.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    dataset = prepare(workdir, a.shape, a.default_network, a.cases, a.device)
    use_demo_hyperparameters(workdir)
    results, _, failed = measure(dataset, plans_name(a.default_network), a.trainers, a.iterations, a.warmup,
                                 a.device)
    if BASELINE not in results:
        sys.exit("the baseline nnUNetTrainer failed; no ratios")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed:
        sys.exit(1)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

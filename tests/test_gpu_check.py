"""benchmarks/gpu_check.py: the CPU smoke run of the whole check (real nnU-Net, tiny data), its time guard, and
benchmarks/overhead.py's work folder keyed by its settings (a stale folder is rebuilt, not reused)."""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_check  # noqa: E402
import overhead  # noqa: E402

RATIO_LINE = re.compile(r"^(nnUNetTrainer\w*) time_ratio=(\d+\.\d\d) memory_ratio=(\d+\.\d\d) ", re.M)


def test_time_guard_refuses_what_does_not_fit(capsys):
    guard = gpu_check.TimeGuard(budget=100.0, reserve=20.0)
    assert guard.allows(10.0, "short run")
    # 79 s x safety 1.25 does not end before start + 80 s
    assert not guard.allows(79.0, "long run")
    assert guard.skipped == ["long run"]
    assert "time guard: not starting long run" in capsys.readouterr().out


def test_estimates_from_the_step0_run(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("2026: Epoch time: 1.5 s\nfoo\n2026: Epoch time: 2.25 s\n")
    assert gpu_check.epoch_seconds(str(log)) == pytest.approx(3.75)
    p = dict(gpu_check.PROFILES["gpu"])
    cost = {"fixed_seconds": 30.0, "seconds_per_iteration": 0.25}
    # 30 s start-up + 60 iterations x 0.25 s x 1.4 (teacher) x 3 / 2 runs sharing the device
    assert gpu_check.step_estimate(p, cost) == pytest.approx(30 + 60 * 0.25 * 1.4 * 1.5)
    assert gpu_check.continual_estimate(p, cost) == pytest.approx(2 * gpu_check.step_estimate(p, cost))
    p["jobs"] = 1
    assert gpu_check.continual_estimate(p, cost) == pytest.approx(6 * gpu_check.step_estimate(p, cost))


def test_continual_chains_and_the_guard(monkeypatch):
    """Chains run steps 1 then 2 per trainer; a refused step leaves the rest of its chain out, named."""
    calls = []
    monkeypatch.setattr(gpu_check, "train", lambda d, t, *a, **k: calls.append((t, d)))
    summary = {"step_datasets": ["S0", "S1", "S2"], "env": {}}
    p = dict(gpu_check.PROFILES["smoke"])
    cost = {"fixed_seconds": 10.0, "seconds_per_iteration": 0.1}
    guard = gpu_check.TimeGuard(budget=1000.0, reserve=0.0)
    gpu_check.run_continual(summary, p, guard, "/nonexistent", [], cost)
    for t in gpu_check.CONTINUAL:
        assert [d for tr, d in calls if tr == t] == ["S1", "S2"]
    assert guard.skipped == []
    calls.clear()
    guard = gpu_check.TimeGuard(budget=10.0, reserve=0.0)  # the first step's estimate (> 10 s) never fits
    gpu_check.run_continual(summary, p, guard, "/nonexistent", [], cost)
    assert calls == []
    assert sorted(guard.skipped) == sorted(f"{t} on {d}" for t in gpu_check.CONTINUAL for d in ("S1", "S2"))

    # a failing run is recorded, its chain stops (no teacher for step 2), the other chains go on
    def failing(d, t, *a, **k):
        if t == "nnUNetTrainerMiB":
            raise RuntimeError("CUDA out of memory")
        calls.append((t, d))
    monkeypatch.setattr(gpu_check, "train", failing)
    failed = []
    gpu_check.run_continual(summary, p, gpu_check.TimeGuard(1000.0, 0.0), "/nonexistent", [], cost, failed)
    assert failed == [{"run": "nnUNetTrainerMiB on S1", "error": "RuntimeError: CUDA out of memory"}]
    assert sorted(calls) == sorted((t, d) for t in gpu_check.CONTINUAL if t != "nnUNetTrainerMiB" for d in ("S1", "S2"))


def test_overhead_work_folder_is_keyed_and_checked(tmp_path):
    assert overhead.settings_key(32, False, 12) != overhead.settings_key(32, True, 12)
    env = {"nnUNet_preprocessed": str(tmp_path / "pre"), "nnUNet_results": str(tmp_path / "res")}
    settings = {"shape": 32, "default_network": True, "cases": 12, "plans": "nnUNetPlans"}
    marker = {"dataset": "Dataset802_S1", "step0": "Dataset801_S0", "settings": settings}
    # the bug of issue 11: a folder prepared with the small network lacks nnUNetPlans.json
    os.makedirs(tmp_path / "pre" / "Dataset802_S1")
    (tmp_path / "pre" / "Dataset802_S1" / "nnUNetPlansSmall.json").write_text("{}")
    assert not overhead.prepared_ok(env, marker, settings)
    (tmp_path / "pre" / "Dataset802_S1" / "nnUNetPlans.json").write_text("{}")
    assert not overhead.prepared_ok(env, marker, settings)  # no step-0 teacher yet (interrupted run)
    fold = tmp_path / "res" / "Dataset801_S0" / "nnUNetTrainerFT__nnUNetPlans__3d_fullres" / "fold_0"
    os.makedirs(fold)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert overhead.prepared_ok(env, marker, settings)
    assert not overhead.prepared_ok(env, marker, {**settings, "shape": 48})  # other settings: stale


@pytest.mark.e2e
def test_gpu_check_smoke(tmp_path):
    """The whole check on CPU at tiny size: ratio lines, JSON, Markdown, the continual table (time guard allowed)."""
    out = tmp_path / "gpu_smoke"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--smoke", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in RATIO_LINE.finditer(proc.stdout)}
    expected = ["nnUNetTrainer", "nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerPGCDDAPD"]
    assert sorted(lines) == sorted(expected), proc.stdout[-4000:]
    assert lines["nnUNetTrainer"] == (1.0, 1.0)
    assert all(t > 0 and m > 0 for t, m in lines.values())

    js = json.loads((out / "gpu_check.json").read_text())
    assert js["mode"] == "smoke" and js["device"]["device"] == "cpu"
    assert js["plan"]["patch_size"] == [32, 32, 32] and js["plan"]["features_per_stage"] == [4, 8, 16, 32]
    assert sorted(js["overhead"]) == sorted(expected) and js["overhead_failed"] == []
    for t in expected:
        r = js["overhead"][t]
        assert r["time_ratio"] == pytest.approx(lines[t][0], abs=0.006)
        assert r["memory_ratio"] == pytest.approx(lines[t][1], abs=0.006)
        assert r["seconds_per_iteration"] > 0 and r["parameters"] > 0
    c = js["continual"]
    trained = {(r["trainer"], r["dataset"]) for r in c["runs"]}
    step0, step1, step2 = js["step_datasets"]
    assert ("nnUNetTrainerFT", step0) in trained and ("nnUNetTrainerJoint", js["joint_dataset"]) in trained
    # every step of every chain is either trained or named as left out by the time guard
    for t in gpu_check.CONTINUAL:
        for d in (step1, step2):
            assert (t, d) in trained or f"{t} on {d}" in c["skipped_runs"], (t, d)
    assert c["stopped_by_time_guard"] == bool(c["skipped_runs"]) and c["failed_runs"] == []
    assert "## Mean Dice per step" in c["report_markdown"] and "## At a glance" in c["report_markdown"]
    assert "| nnUNetTrainerFT | 0 |" in c["report_markdown"]
    for t, d in trained:
        if d in (step1, step2):
            step = 1 if d == step1 else 2
            assert f"| {t} | {step} |" in c["report_markdown"]
    assert js["timings"]["total"] > 0 and not math.isnan(js["timings"]["total"])
    md = (out / "gpu_check.md").read_text()
    assert "## Overhead relative to nnUNetTrainer" in md and "| nnUNetTrainerPGCDDAPD |" in md
    assert "## Continual run (3 steps)" in md
    if c["skipped_runs"]:
        assert "The time guard stopped the continual part" in md and "time guard: not starting" in proc.stdout
    print(f"gpu_check --smoke: {wall:.0f} s wall, timings {js['timings']}")

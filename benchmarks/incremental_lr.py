"""How fast does an incremental step learn its new classes at a given learning rate?

Trains one incremental step with ``nnUNetv2_train`` (the real nnU-Net loop, the package's trainer) from a
finished demo's step-0 model, at a learning rate and a *nominal* schedule length, and stops it as soon as
nnU-Net's per-epoch pseudo Dice of every new class exceeds ``--target`` (default 0.5), or after
``--max-epochs``. It prints how many iterations that took and which fraction of the nominal schedule that is.

Why a nominal schedule: nnU-Net's poly schedule makes the learning rate at iteration ``k`` of ``K`` equal to
``lr * (1 - k/K) ** 0.9``; in the first 20 % of a step it stays above ``0.82 * lr``. Running the first epochs of
a long nominal schedule (``--nominal-epochs``) therefore measures the learning speed at the start of a
full-length step without running the whole step (the default nnU-Net step is 1000 epochs of 250 iterations).

The demo's output folder provides the scenario, the preprocessed data and the step-0 model; every run writes
its own ``nnUNet_results`` below ``--output`` (the step-0 model is linked, not copied) and removes nothing else.

Example (CPU, a demo made with ``nnUNetv2_cimis_demo --output demo_output``)::

    python benchmarks/incremental_lr.py --demo demo_output --output runs/lr --trainer nnUNetTrainerMiB \\
        --lr 1e-3 --nominal-epochs 1000 --max-epochs 20
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

from nnunetv2_cimis.errors import CIMISError, cli_entry

PSEUDO = re.compile(r"Pseudo dice \[(.*)\]")
NUMBER = re.compile(r"(nan|[-+0-9.eE]+)\)?$")


def parse_pseudo_dice(line: str):
    """The per-class values of one nnU-Net ``Pseudo dice [...]`` log line (``nan`` for classes without
    voxels), e.g. ``Pseudo dice [np.float32(nan), np.float32(0.41)]`` -> ``[nan, 0.41]``; None for other lines."""
    m = PSEUDO.search(line)
    if not m:
        return None
    values = []
    for item in m.group(1).split(","):
        n = NUMBER.search(item.strip())
        values.append(float(n.group(1)) if n else float("nan"))
    return values


def _step_dataset(nnunet_root: str, step: int) -> str:
    found = sorted(glob.glob(os.path.join(nnunet_root, "preprocessed", f"Dataset*Step{step}")))
    if not found:
        raise CIMISError(f"no step-{step} dataset under {nnunet_root}/preprocessed; give the output folder of a "
                         f"finished nnUNetv2_cimis_demo run")
    return os.path.basename(found[0])


def run(demo: str, output: str, trainer: str, lr: float, nominal_epochs: int, max_epochs: int,
        iterations: int, target: float) -> dict:
    from nnunetv2_cimis.settings import cpu_nnunet_environment
    root = os.path.join(os.path.abspath(demo), "nnunet")
    step0, step1 = _step_dataset(root, 0), _step_dataset(root, 1)
    tag = f"{trainer}_lr{lr:g}_E{nominal_epochs}"
    results = os.path.join(os.path.abspath(output), tag)
    if os.path.exists(results):
        raise CIMISError(f"{results} exists; choose another --output")
    env = dict(os.environ)
    env.update(cpu_nnunet_environment(root, nominal_epochs, iterations, 2, lr))  # the demo's raw / preprocessed
    env["nnUNet_results"] = results
    os.makedirs(results)
    os.symlink(os.path.join(root, "results", step0), os.path.join(results, step0))
    plans = os.path.basename(glob.glob(os.path.join(root, "preprocessed", step1, "*Plans*.json"))[0])[:-5]
    with open(os.path.join(root, "preprocessed", step1, "dataset.json")) as f:
        new_labels = [int(v) for v in json.load(f).get("cimis", {}).get("new_labels", [])]
    with open(os.path.join(root, "preprocessed", step1, plans + ".json")) as f:
        configuration = "3d_fullres" if "3d_fullres" in json.load(f)["configurations"] else "2d"
    cmd = ["nnUNetv2_train", step1.split("_")[0][len("Dataset"):], configuration, "0", "-tr", trainer,
           "-p", plans, "-device", "cpu"]
    log_path = os.path.join(results, "train.log")
    start = time.time()
    epochs, reached = [], None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                log.write(line)
                values = parse_pseudo_dice(line)
                if values is None:
                    continue
                new = [values[c - 1] for c in new_labels] if new_labels else values
                epochs.append(new)
                print(f"epoch {len(epochs) - 1}: new-class pseudo Dice {new}", flush=True)
                if reached is None and all(v > target for v in new):
                    reached = len(epochs)
                if reached is not None or len(epochs) >= max_epochs:
                    break
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    total = nominal_epochs * iterations
    out = {"trainer": trainer, "lr": lr, "nominal_iterations": total, "iterations_per_epoch": iterations,
           "target": target, "new_pseudo_dice_per_epoch": epochs, "wall_s": round(time.time() - start, 1),
           "iterations_to_target": reached * iterations if reached else None,
           "fraction_of_step": (reached * iterations / total) if reached else None}
    with open(os.path.join(results, "result.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="output folder of a finished nnUNetv2_cimis_demo run")
    p.add_argument("--output", required=True, help="folder for this benchmark's nnUNet_results (one per run)")
    p.add_argument("--trainer", default="nnUNetTrainerMiB")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--nominal-epochs", type=int, default=1000, help="schedule length the lr decays over")
    p.add_argument("--max-epochs", type=int, default=20, help="stop after this many epochs")
    p.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    p.add_argument("--target", type=float, default=0.5, help="new-class pseudo Dice to reach")
    a = p.parse_args(argv)
    out = run(a.demo, a.output, a.trainer, a.lr, a.nominal_epochs, a.max_epochs, a.iterations, a.target)
    if out["iterations_to_target"]:
        print(f"{a.trainer} lr {a.lr:g}: new classes above {a.target} after {out['iterations_to_target']} "
              f"iterations = {100 * out['fraction_of_step']:.2f} % of a {out['nominal_iterations']}-iteration step "
              f"({out['wall_s']:.0f} s)")
    else:
        print(f"{a.trainer} lr {a.lr:g}: new classes not above {a.target} within {a.max_epochs} epochs "
              f"({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nnUNetv2_cimis_demo``: the whole class-incremental loop on CPU, on a built-in synthetic phantom.

1. writes a synthetic phantom as an nnU-Net raw dataset (``nnUNetv2_cimis_phantom``);
2. turns it into the kind's scenario (``nnUNetv2_cimis_make_scenario``: real nnU-Net planning once on step 0,
   plans moved to the other steps, all preprocessed; the kind's network width and CT window written into the
   plans; the 3D kind: liver and left kidney, then the aorta);
3. trains step 0, the joint upper bound and, for every continual trainer, each later step with the real
   ``nnUNetv2_train`` (two runs at a time on two cores; each method continues its own chain);
4. predicts the held-out test set with every step's model through nnU-Net's predictor, scores it with
   nnU-Net's evaluation and writes ``scores.csv``, ``summary.json``, ``report.md`` and
   ``dice_per_class.png`` into ``--output``, and prints the table.

Everything lives under ``--output`` (``nnunet/`` holds nnUNet_raw / _preprocessed / _results).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError, cli_entry

SOURCE_ID, FIRST_STEP_ID = 900, 901
PLANS = "nnUNetPlansDemo"
#: foreground voxels of nnU-Net's intensity statistics (nnU-Net: 10e7): the same statistics on the phantoms,
#: about 25 s less per fingerprint of the 2D demo (make_scenario.fingerprint_extractor)
FINGERPRINT_SAMPLES = 10 ** 6
#: CPU-sized settings of the methods whose defaults are sized for a GPU (written to hparams.json, passed through
#: nnUNet_cimis_hparams): fewer and shorter inversions; a smaller diffusion model on 32 x 32 images, trained
#: shorter at a higher rate to predict the clean image (docs/methods_ddcl.md), and fewer replay samples
DEMO_HYPERPARAMETERS = {
    "nnUNetTrainerMOSInv": {"num_synthetic": 6, "inversion_iterations": 50},
    "nnUNetTrainerDDCL": {"num_synthetic": 16, "diffusion_train_iterations": 100, "diffusion_image_size": 32,
                          "diffusion_channels": [32, 64], "diffusion_learning_rate": 1e-3,
                          "diffusion_prediction_type": "sample"},
}


@dataclass(frozen=True)
class DemoKind:
    """What one demo kind trains: phantom, scenario, network, schedule. Every choice is measured (docs/benchmarks.md).

    ``epochs_*`` count epochs of ``iterations`` training iterations; the incremental steps use ``lr``.
    """

    configuration: str
    scenario: str
    shape: Tuple[int, ...]
    features: Tuple[int, ...]
    step0_trainer: str
    default_trainers: Optional[Tuple[str, ...]]  # None: every continual trainer of the configuration
    organs: Optional[Tuple[str, ...]] = None  # phantom organs drawn and labelled (None: all)
    num_steps: int = 3  # steps of ``scenario``
    intensity_window: Union[str, Tuple[float, float]] = "all"
    cases: int = 15
    iterations: int = 100
    epochs_step0: int = 6
    epochs_joint: int = 6
    epochs: int = 2
    lr: float = 1e-2
    #: hyperparameters of this kind's trainers, on top of :data:`DEMO_HYPERPARAMETERS`
    hyperparameters: Dict[str, Dict[str, object]] = field(default_factory=dict)


KINDS = {
    # 3D CT phantom, 24^3 at 1.5 mm (the phantom's anatomy is drawn relative to the volume, so this is the 32^3
    # phantom at coarser resolution); three organs in two steps. Measured on 2 CPU cores (docs/benchmarks.md): the
    # budget holds one incremental step of four methods; the organs left out did not learn within it even in the
    # joint model: the stomach (0.0 Dice after 300 joint and 150 fine-tuning iterations), the spleen (25 HU from
    # the liver, below 0.3 after 800 joint iterations), the second kidney (augmentation mirrors left and right,
    # so two kidneys are told apart only by context, which emerged after 500-600 joint iterations), the small
    # pancreas and gallbladder. A fixed soft-tissue window, as a radiologist reads an abdominal CT; nnU-Net's
    # percentile window over these bright organs would map fat and bowel to one value. Width 24-48-96 (nnU-Net
    # plans three stages for a 24^3 patch; its default width is 32-64-128): the demo is compute-bound (about 20
    # CPU minutes at width 32, 10 min 39 s on the idle machine), width 24 costs 0.70 of width 32 per iteration
    # and met every bound on two seeds, where width 16 (0.35) learned erratically (the aorta was never learned in
    # one run). 24^3 instead of 32^3: about 2.5 times cheaper per iteration and every bound met on two seeds at
    # the same schedule. Joint model 9 x 50, the iterations of the whole chain (step 0 200 + step 1 250): the joint
    # model learns the left kidney late and at random (pseudo Dice 0 for the first 50-200 iterations in most runs):
    # at 4 x 50 it missed it in one run (0.10), at 5 x 50 in one (0.52), at 6 x 50 in one of three (pseudo Dice 0
    # at every epoch). Incremental lr 2e-2: at 1e-2 fine-tuning missed the aorta in one of five runs (it depends
    # on the step-0 model: from that run's step-0 model it stayed <= 0.16 in the run and in two re-runs); at 2e-2
    # it learned it from that model (validation Dice 0.88) and every method met its bounds on two seeds
    # (docs/benchmarks.md).
    "abdominal3d": DemoKind("3d_fullres", "liver,kidney_left;aorta", (24, 24, 24), (24, 48, 96),
                            "nnUNetTrainerFT",
                            ("nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerPLOP", "nnUNetTrainerPGCDDAPD"),
                            organs=("liver", "aorta", "kidney_left"), num_steps=2,
                            intensity_window=(-150.0, 250.0), cases=24, iterations=50, epochs_step0=4, epochs_joint=9,
                            epochs=5, lr=2e-2),
    # DDCL replays images of a diffusion model trained at the end of each step, so step 0 is trained by DDCL.
    # Measured on 2 CPU cores (docs/benchmarks.md, "2D laparoscopic demo"): with 15 frames (4 per step) and width
    # 8-16-32-64-64 the joint model ended at 0.53; 60 frames with the phantom's distinct colours learn every
    # structure within 200 joint iterations. Every structure is drawn in every frame (run_demo): a class absent
    # from a frame is scored 0 for a few false-positive pixels. Width 16-32-64-128-256: 0.43 of nnU-Net's default
    # width per iteration, and the joint model's pseudo Dice > 0.8 on every structure after 200 iterations in two
    # seeds; at width 32 a run used 1652 s of CPU time, about 14 min on 2 cores. Incremental steps 3 x 100 at lr
    # 2e-2: at 2 x 100 and lr 1e-2 fine-tuning and MiB missed a new structure in one seed of three. Fine-tuning
    # with MiB's head initialisation: with random rows it reached only 0.48 pseudo Dice on fat in that seed after
    # 600 iterations, with MiB's 0.87 after 300 (docs/trainers_baselines.md).
    "laparoscopic2d": DemoKind("2d", "2-2-2", (64, 64), (16, 32, 64, 128, 256), "nnUNetTrainerDDCL",
                               ("nnUNetTrainerFT", "nnUNetTrainerMiB", "nnUNetTrainerDDCL"), cases=60,
                               epochs_joint=6, epochs=3, lr=2e-2,
                               hyperparameters={"nnUNetTrainerFT": {"head_init": "mib"}}),
}


class Clock:
    def __init__(self):
        self.start = time.time()

    def log(self, message: str) -> None:
        t = int(time.time() - self.start)
        print(f"[{t // 60:02d}:{t % 60:02d}] {message}", flush=True)


def demo_environment(output: str, epochs: int, iterations: int, lr: Optional[float] = None,
                     jobs: Optional[int] = None) -> Dict[str, str]:
    """nnU-Net folders under ``output/nnunet`` and the package's one CPU set-up
    (:func:`nnunetv2_cimis.settings.cpu_nnunet_environment`, shared with the tests), two validation iterations,
    no final validation (every model is scored on the held-out test cases instead; on CPU nnU-Net's final
    validation of a demo model costs about 20 s, most of it starting process pools) and, when ``jobs`` runs share
    the machine, the cores divided among them (``OMP_NUM_THREADS``)."""
    from nnunetv2_cimis.settings import ENV_FINAL_VALIDATION, cpu_nnunet_environment
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs else None
    env = cpu_nnunet_environment(os.path.join(os.path.abspath(output), "nnunet"), epochs, iterations, 2, lr, threads)
    env[ENV_FINAL_VALIDATION] = "0"
    return env


def run_training(dataset: str, configuration: str, trainer: str, env: Dict[str, str], log_dir: str,
                 clock: Clock, epochs: Optional[int] = None, plans: str = PLANS, device: str = "cpu") -> float:
    """One real ``nnUNetv2_train`` run on CPU; its output goes to a log file. Returns seconds taken."""
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    if not os.path.isfile(exe):
        exe = shutil.which("nnUNetv2_train") or "nnUNetv2_train"
    run_env = dict(os.environ, **env)
    if epochs is not None:
        run_env["nnUNet_cimis_epochs"] = str(epochs)
    log = os.path.join(log_dir, f"{dataset}__{trainer}.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([exe, dataset, configuration, "0", "-tr", trainer, "-p", plans, "-device", device],
                              env=run_env, stdout=f, stderr=subprocess.STDOUT)
    took = time.time() - t0
    if proc.returncode != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-25:])
        raise CIMISError(f"nnUNetv2_train {dataset} {trainer} failed (exit {proc.returncode}); log {log}:\n{tail}")
    clock.log(f"trained {trainer} on {dataset} ({took:.0f} s)")
    return took


#: cost of one incremental step relative to fine-tuning's, measured on the idle 2-core machine (3D benchmark seeds
#: 1 and 2, 350 iterations: LwF / ILT / MiB 1.2, PGCD and PGCD+DAPD 1.1, DAPD 1.4, PLOP 1.6, MOSInv 1.8; 3D demo:
#: MiB and PGCD+DAPD 1.5, PLOP 1.8; 2D demo: DDCL, which also trains a diffusion model, 3); unlisted: 1.3
STEP_COST = {"nnUNetTrainerFT": 1.0, "nnUNetTrainerPGCD": 1.1, "nnUNetTrainerDAPD": 1.4, "nnUNetTrainerPLOP": 1.7,
             "nnUNetTrainerMOSInv": 1.8, "nnUNetTrainerDDCL": 3.0}


def chain_order(trainers: Sequence[str]) -> List[str]:
    """The order in which the trainers' chains start: the costliest first (:data:`STEP_COST`), so that a long chain
    does not run alone at the end while a core idles (measured: the 2D demo's DDCL chain, started last, ran its two
    steps alone for about 4 minutes; the 3D demo's fine-tuning step, started last after PLOP, alone for 1 min 43 s)."""
    return sorted(trainers, key=lambda t: -STEP_COST.get(t, 1.3))  # stable: the given order among equal costs


def train_scenario(steps: Sequence[str], joint: Optional[str], configuration: str, plans: str,
                   trainers: Sequence[str], env: Dict[str, str], log_dir: str, clock: Clock,
                   epochs_step0: Optional[int] = None, epochs_joint: Optional[int] = None, jobs: int = 2,
                   train_step0: bool = True, device: str = "cpu", step0_trainer: str = "nnUNetTrainerFT") -> None:
    """Train step 0 (``step0_trainer``), the joint bound (``nnUNetTrainerJoint``) and each trainer's chain of
    later steps, ``jobs`` runs at a time."""
    def chain(trainer: str) -> None:
        for d in steps[1:]:
            run_training(d, configuration, trainer, env, log_dir, clock, plans=plans, device=device)

    trainers = chain_order(trainers)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        joint_future = None
        if joint:
            joint_future = pool.submit(run_training, joint, configuration, "nnUNetTrainerJoint", env, log_dir, clock,
                                       epochs_joint, plans, device)
        if train_step0:
            run_training(steps[0], configuration, step0_trainer, env, log_dir, clock, epochs_step0, plans,
                         device)
        futures = [pool.submit(chain, t) for t in trainers]
        for f in futures + ([joint_future] if joint_future else []):
            f.result()


def run_demo(output: str, trainers: Optional[Sequence[str]] = None, kind: str = "abdominal3d",
             num_cases: Optional[int] = None, epochs: Optional[int] = None, epochs_step0: Optional[int] = None,
             iterations: Optional[int] = None, epochs_joint: Optional[int] = None, jobs: int = 2, seed: int = 0,
             overwrite: bool = False, lr: Optional[float] = None,
             features: Optional[Sequence[int]] = None) -> dict:
    """Run the demo (see module docstring); returns the evaluation summary. Unset arguments take the kind's
    defaults (:data:`KINDS`)."""
    from nnunetv2_cimis.scenarios.make_scenario import check_features_per_stage, make_scenario
    from nnunetv2_cimis.training.registry import continual_trainers
    if kind not in KINDS:
        raise CIMISError(f"Unknown phantom kind {kind!r}; choose one of {sorted(KINDS)}.")
    k = KINDS[kind]
    configuration, scenario, shape, step0_trainer = k.configuration, k.scenario, k.shape, k.step0_trainer
    features = k.features if features is None else features
    num_cases = k.cases if num_cases is None else num_cases
    epochs = k.epochs if epochs is None else epochs
    epochs_step0 = k.epochs_step0 if epochs_step0 is None else epochs_step0
    epochs_joint = k.epochs_joint if epochs_joint is None else epochs_joint
    iterations = k.iterations if iterations is None else iterations
    lr = k.lr if lr is None else lr
    features = check_features_per_stage(features)  # before the phantom is written
    default_trainers = list(k.default_trainers) if k.default_trainers else None
    dims = len(shape)
    available = continual_trainers(dims)
    if trainers and list(trainers) == ["all"]:
        trainers = available
    trainers = list(trainers) if trainers else (default_trainers or available)
    unknown = [t for t in trainers if t not in available]
    if unknown:
        raise CIMISError(f"Unknown or unsuitable trainers for {kind}: {unknown}. Available: {available}.")
    if "nnUNetTrainerFT" not in trainers:
        trainers = ["nnUNetTrainerFT"] + trainers  # the lower bound is always shown
    output = os.path.abspath(output)
    if os.path.isdir(os.path.join(output, "nnunet")):
        if not overwrite:
            raise CIMISError(f"{output} already holds a demo; pass --overwrite or choose another --output.")
        shutil.rmtree(os.path.join(output, "nnunet"))
    clock = Clock()
    env = demo_environment(output, epochs, iterations, lr, jobs)
    hparams = os.path.join(output, "hparams.json")
    with open(hparams, "w") as f:
        json.dump({**DEMO_HYPERPARAMETERS, **k.hyperparameters}, f, indent=2)
    env["nnUNet_cimis_hparams"] = hparams
    os.environ.update(env)
    log_dir = os.path.join(output, "logs")
    os.makedirs(log_dir, exist_ok=True)

    clock.log(f"writing the {kind} phantom ({num_cases} cases) under {env['nnUNet_raw']}")
    if kind == "abdominal3d":
        from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
        write_abdominal_phantom(env["nnUNet_raw"], SOURCE_ID, num_cases, shape=shape, seed=seed, organs=k.organs)
    else:
        from nnunetv2_cimis.phantom.laparoscopic2d import write_laparoscopic_phantom
        # every structure in every frame (presence 1): nnU-Net scores a class absent from a frame 0 for a few
        # false-positive pixels, which at presence 0.7 dominated the scores (docs/benchmarks.md)
        write_laparoscopic_phantom(env["nnUNet_raw"], SOURCE_ID, num_cases, seed=seed, shape=shape, presence=1.0)
    clock.log(f"making scenario {scenario}: nnU-Net plans step 0, plans moved, every step preprocessed")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        ids = [FIRST_STEP_ID + i for i in range(k.num_steps)]
        summary = make_scenario(str(SOURCE_ID), scenario, ids, seed=seed,
                                configuration=configuration, plans_name=PLANS, features_per_stage=features,
                                step0_trainer=step0_trainer, intensity_window=k.intensity_window,
                                fingerprint_samples=FINGERPRINT_SAMPLES)
    steps, joint = summary["step_datasets"], summary["joint_dataset"]
    clock.log(f"steps: {', '.join(f'{d} learns {c}' for d, c in zip(steps, summary['classes_per_step']))}")
    clock.log(f"cases per step {summary['cases_per_step']}, test cases {summary['test_cases']}; training "
              f"{len(trainers)} methods with {jobs} parallel runs, logs in {log_dir}")

    train_scenario(steps, joint, configuration, PLANS, trainers, env, log_dir, clock, epochs_step0,
                   epochs_joint, jobs, step0_trainer=step0_trainer)
    clock.log("evaluating every step's model on the held-out test set")
    from nnunetv2_cimis.evaluation.evaluate import evaluate_scenario
    # the tables, then the at-a-glance lines (and any bounds WARNING) last, where they stay in view
    result = evaluate_scenario(steps[0], configuration, PLANS, 0, trainers, output, num_processes=0,
                               print_table=True, use_mirroring=False)  # the demo's measured runs: no mirroring
    clock.log(f"done. Results in {output}: scores.csv, summary.json, report.md, dice_per_class.png")
    return result


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("--output", "-o", required=True, help="folder for everything the demo writes")
    p.add_argument("--trainers", nargs="+", default=None,
                   help="continual trainers, or 'all' for every continual trainer of the kind (default: FT, MiB, PLOP "
                        "and PGCD+DAPD for abdominal3d; FT, MiB and DDCL for laparoscopic2d)")
    p.add_argument("--kind", default="abdominal3d", choices=sorted(KINDS), help="phantom: 3D CT or 2D laparoscopy")
    p.add_argument("--cases", type=int, default=None, help="phantom cases (test set and three steps)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per epoch")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each incremental step")
    p.add_argument("--epochs-step0", type=int, default=None, help="epochs of step 0")
    p.add_argument("--epochs-joint", type=int, default=None, help="epochs of the joint model")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate of incremental steps (default per kind, the demo's steps being short: "
                        + ", ".join(f"{name} {k.lr:g}" for name, k in KINDS.items()) + ")")
    p.add_argument("--features-per-stage", type=int, nargs="+", default=None,
                   help="network width: features per encoder stage, written into the plans (default per kind: "
                        + "; ".join(f"{name} {' '.join(map(str, k.features))}" for name, k in KINDS.items()) + ")")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom and of the patient split")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    a = p.parse_args(argv)
    run_demo(a.output, a.trainers, a.kind, a.cases, a.epochs, a.epochs_step0, a.iterations, a.epochs_joint,
             a.jobs, a.seed, a.overwrite, a.lr, a.features_per_stage)


if __name__ == "__main__":
    main()

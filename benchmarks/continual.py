"""Run several trainers side by side on one scenario and write the continual evaluation.

Default: the built-in phantom scenario (exactly the demo's: phantom, 3-step scenario, small network).
With ``--dataset``: any scenario made by ``nnUNetv2_cimis_make_scenario`` (give any of its step datasets; the
environment's nnUNet_raw / _preprocessed / _results are used), e.g. a BTCV "4-4-5" scenario on a GPU machine.

Examples::

    python benchmarks/continual.py --output runs/phantom --trainers nnUNetTrainerFT nnUNetTrainerMiB
    python benchmarks/continual.py --output runs/btcv --dataset 501 -c 3d_fullres -p nnUNetPlans \\
        --trainers nnUNetTrainerMiB nnUNetTrainerPGCDDAPD --iterations 250 --epochs 100
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnunetv2_cimis.errors import cli_entry


@cli_entry
def main(argv=None):
    from nnunetv2_cimis.demo import Clock, run_demo, train_scenario
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--trainers", nargs="+", default=None, help="default: every continual trainer")
    p.add_argument("--dataset", "-d", default=None, help="a step dataset of an existing scenario (default: phantom)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--iterations", type=int, default=100, help="iterations per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each incremental step")
    p.add_argument("--epochs-step0", type=int, default=6)
    p.add_argument("--epochs-joint", type=int, default=6)
    p.add_argument("--lr", type=float, default=None, help="initial lr of incremental steps (nnUNet_cimis_lr)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--skip-step0", action="store_true", help="step 0 is already trained (nnUNetTrainerFT)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args(argv)
    if a.dataset is None:
        result = run_demo(a.output, a.trainers, "abdominal3d", 15, a.epochs, a.epochs_step0, a.iterations,
                          a.epochs_joint, a.jobs, overwrite=True, lr=a.lr or 1e-2)
    else:
        from nnunetv2_cimis.cli import ensure_trainer_path
        from nnunetv2_cimis.evaluation.evaluate import evaluate_scenario
        from nnunetv2_cimis.scenarios.datasets import dataset_name, require_env
        from nnunetv2_cimis.scenarios.step_metadata import read_step_info
        from nnunetv2_cimis.training.registry import continual_trainers
        ensure_trainer_path()
        name = dataset_name(a.dataset)
        with open(os.path.join(require_env("nnUNet_raw"), name, "dataset.json")) as f:
            info = read_step_info(json.load(f), name)
        trainers = a.trainers or continual_trainers(3 if a.configuration.startswith("3d") else 2)
        env = {"nnUNet_cimis_epochs": str(a.epochs), "nnUNet_cimis_iterations": str(a.iterations),
               "OMP_WAIT_POLICY": "PASSIVE", **({"nnUNet_cimis_lr": str(a.lr)} if a.lr else {})}
        log_dir = os.path.join(os.path.abspath(a.output), "logs")
        os.makedirs(log_dir, exist_ok=True)
        train_scenario(info.step_datasets, info.joint_dataset, a.configuration, a.plans, trainers, env, log_dir,
                       Clock(), a.epochs_step0, a.epochs_joint, a.jobs, not a.skip_step0, a.device)
        result = evaluate_scenario(name, a.configuration, a.plans, 0, trainers, a.output, num_processes=0)
        print(result["markdown"])
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

"""Helpers for end-to-end tests: a tiny phantom scenario run through the real nnU-Net.

``make_tiny_scenario`` writes a 32^3 phantom, turns it into a 3-step scenario with a tiny network
(features 4-8-16-32) and preprocesses every step with nnU-Net. ``train`` runs the real ``nnUNetv2_train``
CLI for a few iterations; ``build_trainer`` instantiates a trainer in-process the way ``nnUNetv2_train``
does, for tests that drive single hooks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence

import torch

PLANS = "nnUNetPlansTiny"
CONFIGURATION = "3d_fullres"
FEATURES = (4, 8, 16, 32)


def nnunet_env(root: str, iterations: int = 2, epochs: int = 1, val_iterations: int = 1) -> Dict[str, str]:
    """Environment variables for nnU-Net and the package's trainers under ``root``: the package's CPU set-up
    (:func:`nnunetv2_cimis.settings.cpu_nnunet_environment`, shared with the demo), one OpenMP thread."""
    from nnunetv2_cimis.settings import cpu_nnunet_environment
    return cpu_nnunet_environment(root, epochs, iterations, val_iterations, omp_threads=1)


def make_tiny_scenario(root: str, scenario: str = "2-2-2", num_cases: int = 13, ids: Sequence[int] = (901, 902, 903),
                       source_id: int = 900, shape=(32, 32, 32)) -> dict:
    """Phantom + scenario + plans + preprocessing under ``root``; sets ``os.environ`` (see :func:`nnunet_env`).

    Returns the summary of ``make_scenario`` plus ``"env"``.
    """
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    env = nnunet_env(root)
    os.environ.update(env)
    write_abdominal_phantom(env["nnUNet_raw"], source_id, num_cases, shape=shape, seed=0)
    summary = make_scenario(str(source_id), scenario, list(ids), test_fraction=0.2, seed=0,
                            configuration=CONFIGURATION, plans_name=PLANS, features_per_stage=FEATURES,
                            num_processes=1, fingerprint_samples=10 ** 6)  # nnU-Net's 10e7 only costs time here
    summary["env"] = env
    return summary


def train(dataset: str, trainer: str, env: Dict[str, str], fold: int = 0, extra_env: Optional[dict] = None,
          args: Sequence[str] = (), configuration: str = CONFIGURATION, plans: str = PLANS) -> subprocess.CompletedProcess:
    """Run the real ``nnUNetv2_train`` on CPU; raise with the log's tail if it fails."""
    full_env = dict(os.environ, **env, **(extra_env or {}))
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    cmd = [exe, dataset, configuration, str(fold), "-tr", trainer, "-p", plans, "-device", "cpu", *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def model_folder(env: Dict[str, str], dataset: str, trainer: str, fold: int = 0, configuration: str = CONFIGURATION,
                 plans: str = PLANS) -> str:
    return os.path.join(env["nnUNet_results"], dataset, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


def build_trainer(dataset: str, trainer_class, fold: int = 0, continue_training: bool = False,
                  configuration: str = CONFIGURATION, plans_name: str = PLANS):
    """Instantiate ``trainer_class`` on ``dataset`` as ``nnUNetv2_train`` does (CPU)."""
    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    with open(os.path.join(pre, plans_name + ".json")) as f:
        plans = json.load(f)
    plans["continue_training"] = continue_training
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    return trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                         device=torch.device("cpu"))


class InProcessPool:
    """Stands in for nnU-Net's spawn pools in tests: the same functions, run in this process (a spawn costs
    seconds)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


def in_process_multiprocessing():
    """A stand-in for the ``multiprocessing`` module whose ``get_context(...).Pool`` is :class:`InProcessPool`."""
    import types
    context = types.SimpleNamespace(Pool=InProcessPool)
    return types.SimpleNamespace(get_context=lambda method=None: context)

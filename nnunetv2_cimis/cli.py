"""Small shared command-line helpers."""
from __future__ import annotations

import os

TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_trainers")


def trainer_path() -> str:
    """The folder to list in ``nnUNet_extTrainer`` so nnU-Net finds the package's trainers."""
    return TRAINER_FOLDER


def ensure_trainer_path(env: dict = None) -> dict:
    """Add the package's trainer folder to ``nnUNet_extTrainer`` in ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    current = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_FOLDER not in current:
        env["nnUNet_extTrainer"] = os.pathsep.join(current + [TRAINER_FOLDER])
    return env


def print_trainer_path():
    """``nnUNetv2_cimis_trainer_path``: print the folder for ``export nnUNet_extTrainer=...``."""
    print(TRAINER_FOLDER)

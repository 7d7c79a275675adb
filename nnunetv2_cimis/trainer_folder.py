"""The folder that ``nnUNet_extTrainer`` lists so that nnU-Net's own commands find the package's trainers.

nnU-Net looks a trainer up by class name (``nnUNetv2_train -tr NAME``, ``nnUNetv2_predict -tr NAME``) in its own
trainer folder and then in every folder of ``nnUNet_extTrainer``: it imports each module of the folder by its bare
name and takes the first module that has a class of that name. ``nnunetv2_cimis/nnunet_trainers/`` is that folder:
one module per module of ``nnunetv2_cimis/training/trainers/`` (and one for ``training/incremental_trainer.py``),
each only re-exporting the trainer classes.
"""
from __future__ import annotations

import argparse
import os

from nnunetv2_cimis.command_options import add_version_argument

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


def print_trainer_path(argv=None):
    """``nnUNetv2_cimis_trainer_path``: print the folder for ``export nnUNet_extTrainer=...``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cimis_trainer_path",
        description="Print the folder that nnUNet_extTrainer must list so that nnUNetv2_train and nnUNetv2_predict "
                    "find the package's trainers. Append it to an existing value: export "
                    "nnUNet_extTrainer=\"${nnUNet_extTrainer:+$nnUNet_extTrainer:}$(nnUNetv2_cimis_trainer_path)\"")
    add_version_argument(p)
    p.parse_args(argv)
    print(TRAINER_FOLDER)

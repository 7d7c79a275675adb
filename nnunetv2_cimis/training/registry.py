"""The package's trainers, found the way nnU-Net finds them (the modules of the ``nnUNet_extTrainer`` folder)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List

from nnunetv2_cimis.trainer_folder import TRAINER_FOLDER


def package_trainers() -> Dict[str, type]:
    """Trainer name -> class for every trainer re-exported in ``nnunetv2_cimis/nnunet_trainers``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    found = {}
    for info in pkgutil.iter_modules([TRAINER_FOLDER]):
        module = importlib.import_module(f"nnunetv2_cimis.nnunet_trainers.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainer"):
                found[name] = obj
    return found


def continual_trainers(spatial_dims: int = 3) -> List[str]:
    """Names of the incremental trainers usable for ``spatial_dims``-D data, fine-tuning first, then by name."""
    from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerIncremental
    names = [n for n, c in package_trainers().items()
             if issubclass(c, nnUNetTrainerIncremental) and c is not nnUNetTrainerIncremental
             and spatial_dims in getattr(c, "spatial_dims", (2, 3))]
    order = ["nnUNetTrainerFT", "nnUNetTrainerLwF", "nnUNetTrainerILT", "nnUNetTrainerMiB", "nnUNetTrainerPLOP"]
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)

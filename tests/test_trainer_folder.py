"""The folder ``nnUNet_extTrainer`` lists (``nnunetv2_cimis/nnunet_trainers``) mirrors the trainer modules one to
one, each module only re-exporting its trainers, and nnU-Net's own search finds every trainer there by name."""
import importlib
import inspect
import pkgutil

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunetv2_cimis.training.trainers as trainers_package
from nnunetv2_cimis.training import incremental_trainer
from nnunetv2_cimis.training.registry import package_trainers
from nnunetv2_cimis.trainer_folder import TRAINER_FOLDER

MIRRORED = {info.name: f"{trainers_package.__name__}.{info.name}"
            for info in pkgutil.iter_modules(trainers_package.__path__)}
MIRRORED["incremental_trainer"] = incremental_trainer.__name__


def trainers_defined_in(module) -> dict:
    return {n: c for n, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, nnUNetTrainer) and c.__module__ == module.__name__}


def test_one_shim_per_trainer_module():
    shims = {info.name for info in pkgutil.iter_modules([TRAINER_FOLDER])}
    assert shims == set(MIRRORED)


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_shim_reexports_exactly_the_module_trainers(name):
    shim = importlib.import_module(f"nnunetv2_cimis.nnunet_trainers.{name}")
    defined = trainers_defined_in(importlib.import_module(MIRRORED[name]))
    exported = {n: getattr(shim, n) for n in shim.__all__}
    assert defined and exported == defined  # the same class objects, nothing else
    assert {n for n, v in vars(shim).items() if inspect.isclass(v)} == set(defined)


def test_nnunet_finds_every_trainer_by_name(monkeypatch):
    """nnU-Net's lookup (as ``nnUNetv2_train -tr NAME``) imports the folder's modules by their bare names."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_FOLDER)
    found = package_trainers()
    assert {"nnUNetTrainerFT", "nnUNetTrainerJoint", "nnUNetTrainerLwF", "nnUNetTrainerILT", "nnUNetTrainerMiB",
            "nnUNetTrainerPLOP", "nnUNetTrainerPGCD", "nnUNetTrainerDAPD", "nnUNetTrainerPGCDDAPD",
            "nnUNetTrainerMOSInv", "nnUNetTrainerDDCL", "nnUNetTrainerIAPL"} <= set(found)
    for name, cls in found.items():
        assert recursive_find_trainer_class_by_name(name) is cls, name

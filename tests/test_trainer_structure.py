"""The method trainers stay thin: each module of ``nnunetv2_cimis/training/trainers`` is under 150 lines, and each
incremental method trainer overrides at most one of nnU-Net's own ``nnUNetTrainer`` methods (the rest goes
through the base's method hooks: ``build_method_losses``, ``replay_batch``, ``compute_loss``, ...)."""
import importlib
import inspect
import os
import pkgutil

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunetv2_cimis.training.trainers as trainers_package
from nnunetv2_cimis.training.incremental_trainer import nnUNetTrainerIncremental

MAX_LINES = 150
#: nnUNetTrainerIAPL is not incremental: it subclasses nnUNetTrainer and changes its architecture, loss and
#: per-epoch threshold, the hooks nnU-Net offers for that (see its module docstring)
ARCHITECTURE_TRAINER_HOOKS = {"nnUNetTrainerIAPL": {"__init__", "build_network_architecture", "_build_loss",
                                                    "on_train_epoch_start"}}

MODULES = [info.name for info in pkgutil.iter_modules(trainers_package.__path__)]


def nnunet_methods():
    """Names of the methods nnU-Net's trainer defines (its hooks), dunder methods other than ``__init__`` aside."""
    names = set()
    for klass in nnUNetTrainer.__mro__[:-1]:  # without object
        names |= {n for n, v in vars(klass).items()
                  if (callable(v) or isinstance(v, (staticmethod, classmethod, property)))
                  and (n == "__init__" or not n.startswith("__"))}
    return names


def trainer_classes(module_name):
    module = importlib.import_module(f"{trainers_package.__name__}.{module_name}")
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, nnUNetTrainer) and c.__module__ == module.__name__]


@pytest.mark.parametrize("module_name", MODULES)
def test_trainer_module_is_short(module_name):
    with open(os.path.join(trainers_package.__path__[0], f"{module_name}.py")) as f:
        n = len(f.read().splitlines())
    assert n < MAX_LINES, f"training/trainers/{module_name}.py has {n} lines (limit {MAX_LINES})"


@pytest.mark.parametrize("module_name", MODULES)
def test_trainer_overrides_at_most_one_nnunet_hook(module_name):
    hooks = nnunet_methods()
    assert {"train_step", "validation_step", "initialize", "configure_optimizers", "__init__"} <= hooks
    classes = trainer_classes(module_name)
    assert classes, f"training/trainers/{module_name}.py defines no trainer"
    for cls in classes:
        overridden = set(vars(cls)) & hooks
        if cls.__name__ in ARCHITECTURE_TRAINER_HOOKS:
            assert overridden <= ARCHITECTURE_TRAINER_HOOKS[cls.__name__], (cls.__name__, overridden)
            continue
        assert issubclass(cls, nnUNetTrainerIncremental), cls.__name__
        assert len(overridden) <= 1, f"{cls.__name__} overrides the nnU-Net hooks {sorted(overridden)}"

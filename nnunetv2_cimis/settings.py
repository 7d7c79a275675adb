"""Settings of the package's trainers that come from the environment, the nnU-Net way.

nnU-Net trainers cannot take extra constructor arguments (the base class records its init arguments for
checkpoints), so nnU-Net itself reads switches such as ``nnUNet_compile`` from the environment. We do the
same for training length, learning rate and method hyperparameters:

==============================  ==========================================================================
``nnUNet_cimis_epochs``         number of epochs (nnU-Net default 1000)
``nnUNet_cimis_iterations``     training iterations per epoch (default 250)
``nnUNet_cimis_val_iterations`` validation iterations per epoch (default 50)
``nnUNet_cimis_lr``             initial learning rate of incremental steps (t > 0)
``nnUNet_cimis_hparams``        a JSON object, or the path of a JSON file, overriding named hyperparameters
==============================  ==========================================================================
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping

from nnunetv2_cimis.errors import CIMISError

ENV_EPOCHS = "nnUNet_cimis_epochs"
ENV_ITERATIONS = "nnUNet_cimis_iterations"
ENV_VAL_ITERATIONS = "nnUNet_cimis_val_iterations"
ENV_LR = "nnUNet_cimis_lr"
ENV_HPARAMS = "nnUNet_cimis_hparams"
ENV_TEACHER = "nnUNet_cimis_teacher"


def _positive(name: str, cast):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise CIMISError(f"{name}={raw!r} is not a valid {cast.__name__}; unset it or give a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise CIMISError(f"{name}={raw!r} must be positive")
    return value


def apply_training_length(trainer) -> None:
    """Set ``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch`` from the environment."""
    epochs = _positive(ENV_EPOCHS, int)
    iters = _positive(ENV_ITERATIONS, int)
    val_iters = _positive(ENV_VAL_ITERATIONS, int)
    if epochs is not None:
        trainer.num_epochs = epochs
    if iters is not None:
        trainer.num_iterations_per_epoch = iters
    if val_iters is not None:
        trainer.num_val_iterations_per_epoch = val_iters


def incremental_lr(default: float) -> float:
    """The initial learning rate of an incremental step: ``nnUNet_cimis_lr`` or ``default``."""
    value = _positive(ENV_LR, float)
    return default if value is None else value


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN / inf anywhere in a parsed JSON value (1e999 parses to inf without passing parse_constant)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CIMISError(f"{where} holds {value}: hyperparameters must be finite numbers")
    if isinstance(value, dict):
        for v in value.values():
            _check_finite(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_finite(v, where)


def resolve_hyperparameters(defaults: Mapping[str, Any], trainer_name: str) -> Dict[str, Any]:
    """Merge ``nnUNet_cimis_hparams`` into a method's defaults; unknown names are an error.

    The JSON may be flat (``{"kd_weight": 5}``) or keyed by trainer name
    (``{"nnUNetTrainerMiB": {"kd_weight": 5}}``), so one file can serve several trainers.
    """
    hp = dict(defaults)
    raw = os.environ.get(ENV_HPARAMS, "").strip()
    if not raw:
        return hp
    if os.path.isfile(raw):
        with open(raw) as f:
            text = f.read()
    else:
        text = raw
    def refuse_constant(name):
        raise CIMISError(f"{ENV_HPARAMS} holds {name}: hyperparameters must be finite numbers")

    try:
        overrides = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        raise CIMISError(f"{ENV_HPARAMS} is neither a JSON object nor the path of a JSON file ({e})") from None
    _check_finite(overrides, ENV_HPARAMS)
    if not isinstance(overrides, dict):
        raise CIMISError(f"{ENV_HPARAMS} must hold a JSON object, got {type(overrides).__name__}")
    if trainer_name in overrides and isinstance(overrides[trainer_name], dict):
        overrides = overrides[trainer_name]
    elif any(k.startswith("nnUNetTrainer") for k in overrides):
        return hp  # keyed by trainer name, nothing for this trainer
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise CIMISError(f"{ENV_HPARAMS} names unknown hyperparameters {unknown} for {trainer_name}; "
                         f"known: {sorted(defaults)}")
    for k, v in overrides.items():
        default = defaults[k]
        if isinstance(default, bool) and not isinstance(v, bool):
            raise CIMISError(f"hyperparameter {k} of {trainer_name} must be true/false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CIMISError(f"hyperparameter {k} of {trainer_name} must be a number, got {v!r}")
            if isinstance(default, int) and not float(v).is_integer():
                raise CIMISError(f"hyperparameter {k} of {trainer_name} must be an integer, got {v!r}")
            v = type(default)(v)
        hp[k] = v
    return hp

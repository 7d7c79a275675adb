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
``nnUNet_cimis_variant_folders`` ``1``: results folders named after the non-default settings (see below)
``nnUNet_cimis_final_validation`` ``0``: skip nnU-Net's final validation after training (default ``1``); the
                                model is validated later with ``nnUNetv2_train ... --val``
``OMP_NUM_THREADS``             honoured on CPU: ``nnUNetv2_train -device cpu`` gives torch one thread per
                                core whatever it says, which oversubscribes the cores when runs share them
==============================  ==========================================================================

Results folders of variants. nnU-Net names a results folder ``<trainer>__<plans>__<configuration>`` from the
trainer's class name, so runs that differ only in ``nnUNet_cimis_hparams`` / ``nnUNet_cimis_lr`` would share a
folder. With ``nnUNet_cimis_variant_folders=1`` the trainer part becomes ``<trainer>_<settings>``
(:func:`variant_trainer_name`, e.g. ``nnUNetTrainerMiB_kd_weight5_lr0p005``); the name stays a Python
identifier without ``__``, so ``nnUNetv2_predict -tr nnUNetTrainerMiB_kd_weight5_lr0p005`` finds the folder
(nnU-Net takes the trainer class from the checkpoint, not from ``-tr``). Training length
(``nnUNet_cimis_epochs`` / ``_iterations``) is not part of the name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

from nnunetv2_cimis.errors import CIMISError

ENV_EPOCHS = "nnUNet_cimis_epochs"
ENV_ITERATIONS = "nnUNet_cimis_iterations"
ENV_VAL_ITERATIONS = "nnUNet_cimis_val_iterations"
ENV_LR = "nnUNet_cimis_lr"
ENV_HPARAMS = "nnUNet_cimis_hparams"
ENV_TEACHER = "nnUNet_cimis_teacher"
ENV_VARIANT_FOLDERS = "nnUNet_cimis_variant_folders"
ENV_FINAL_VALIDATION = "nnUNet_cimis_final_validation"
#: longer settings parts are replaced by a hash of the settings
MAX_VARIANT_LENGTH = 80


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


def final_validation_enabled() -> bool:
    """Whether the trainer runs nnU-Net's final validation after training (``nnUNet_cimis_final_validation``,
    default on). The demo and the benchmarks switch it off: they score every model on held-out test cases, and
    on CPU the validation of a tiny model costs about 20 s, most of it starting nnU-Net's export and metric pools."""
    raw = os.environ.get(ENV_FINAL_VALIDATION, "").strip()
    if raw in ("", "1"):
        return True
    if raw == "0":
        return False
    raise CIMISError(f"{ENV_FINAL_VALIDATION}={raw!r}: use 1 (nnU-Net's final validation, the default) or 0 (skip "
                     f"it)")


def apply_cpu_threads(device) -> None:
    """On CPU, give torch ``OMP_NUM_THREADS`` threads when it is set.

    ``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(<number of cores>)`` before it builds the trainer,
    so ``OMP_NUM_THREADS`` has no effect on torch; two runs sharing two cores then run four threads (measured on
    2 cores: two concurrent runs of 120 iterations, 1 thread each 1 min 45 s, 2 threads each 1 min 53 s)."""
    import torch
    if getattr(device, "type", str(device)) != "cpu":
        return
    n = _positive("OMP_NUM_THREADS", int)
    if n is not None:
        torch.set_num_threads(n)


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


def variant_folders_enabled() -> bool:
    """``nnUNet_cimis_variant_folders``: 1/true/yes/on or 0/false/no/off (unset = off)."""
    raw = os.environ.get(ENV_VARIANT_FOLDERS, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise CIMISError(f"{ENV_VARIANT_FOLDERS}={raw!r} must be 1 (results folders named after the non-default "
                     f"settings) or 0 / unset (nnU-Net's folder names)")


def _identifier_part(value: Any) -> str:
    """A setting's value as letters, digits and single underscores: 0.005 -> 0p005, -1e-05 -> m1em05."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = f"{value:g}".replace("-", "m").replace("+", "").replace(".", "p")
    elif isinstance(value, (list, tuple)):
        text = "_".join(_identifier_part(v) for v in value) or "none"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True)
    text = "".join(c if c.isascii() and c.isalnum() else "_" for c in text)
    return "_".join(part for part in text.split("_") if part) or "none"


def variant_settings(defaults: Mapping[str, Any], hp: Mapping[str, Any], lr: Optional[float],
                     default_lr: Optional[float]) -> Dict[str, Any]:
    """The settings that differ from the trainer's defaults: hyperparameters, and ``lr`` when given."""
    changed = {k: hp[k] for k in sorted(hp) if k not in defaults or hp[k] != defaults[k]}
    if lr is not None and lr != default_lr:
        changed["lr"] = lr
    return changed


def variant_trainer_name(trainer_name: str, changed: Mapping[str, Any]) -> str:
    """``trainer_name`` for default settings, else ``<trainer_name>_<key><value>_...`` (a Python identifier
    without ``__``; a hash of the settings when that part would exceed :data:`MAX_VARIANT_LENGTH`)."""
    if not changed:
        return trainer_name
    parts = []
    for k, v in changed.items():
        key, value = _identifier_part(k), _identifier_part(v)
        parts.append(f"{key}{value}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{key}_{value}")
    suffix = "_".join(parts)
    if len(suffix) > MAX_VARIANT_LENGTH:
        digest = hashlib.sha1(json.dumps(dict(changed), sort_keys=True, default=str).encode()).hexdigest()[:12]
        suffix = f"settings{digest}"
    return f"{trainer_name.rstrip('_')}_{suffix}"


def results_trainer_name(trainer_name: str, defaults: Mapping[str, Any], default_lr: Optional[float],
                         is_incremental: bool, hp: Optional[Mapping[str, Any]] = None) -> str:
    """The trainer part of a run's results folder: ``trainer_name``, or with ``nnUNet_cimis_variant_folders=1``
    the variant name of the non-default settings in the environment. The learning rate counts at incremental
    steps only (``nnUNet_cimis_lr`` does not apply to step 0)."""
    if not variant_folders_enabled():
        return trainer_name
    if hp is None:
        hp = resolve_hyperparameters(defaults, trainer_name)
    lr = incremental_lr(default_lr) if is_incremental and default_lr is not None else None
    return variant_trainer_name(trainer_name, variant_settings(defaults, hp, lr, default_lr))


def nnunet_fold_folders(trainer_name: str, plans: Mapping[str, Any], configuration: str, fold) -> list:
    """The folders nnU-Net's trainer ``__init__`` creates for a fold (dataset, model, fold), outermost first;
    empty when ``nnUNet_results`` is unset."""
    root = os.environ.get("nnUNet_results")
    if not root:
        return []
    dataset = os.path.join(root, str(plans.get("dataset_name")))
    model = os.path.join(dataset, f"{trainer_name}__{plans.get('plans_name')}__{configuration}")
    return [dataset, model, os.path.join(model, f"fold_{fold}")]


def move_to_variant_folder(trainer, folder_trainer_name: str, created: list) -> None:
    """Point a just-built nnU-Net trainer at ``<folder_trainer_name>__<plans>__<configuration>/fold_x``.

    nnU-Net's ``__init__`` has already made folders under the class name and started this run's log file there
    (its citation banner): the log file moves to the new folder, and the folders listed in ``created`` (those
    that did not exist before) are removed again if empty. The logger is rebuilt on the new folder.
    """
    if trainer.output_folder_base is None or folder_trainer_name == type(trainer).__name__:
        return
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    trainer.output_folder_base = os.path.join(
        os.path.dirname(trainer.output_folder_base),
        f"{folder_trainer_name}__{trainer.plans_manager.plans_name}__{trainer.configuration_name}")
    trainer.output_folder = os.path.join(trainer.output_folder_base, f"fold_{trainer.fold}")
    os.makedirs(trainer.output_folder, exist_ok=True)
    old_log = trainer.log_file
    trainer.log_file = os.path.join(trainer.output_folder, os.path.basename(old_log))
    if os.path.isfile(old_log):  # nnU-Net's __init__ has already logged its banner there
        os.replace(old_log, trainer.log_file)
    trainer.logger = MetaLogger(trainer.output_folder, trainer.logger.resume)
    trainer.logger.update_config({"plans": trainer.plans_manager.plans, "configuration": trainer.configuration_name,
                                  "fold": trainer.fold, "dataset": trainer.dataset_json})
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only if empty: a folder nnU-Net made for this run and nothing wrote into
        except OSError:
            pass


def cpu_nnunet_environment(root: str, epochs: int, iterations: int, val_iterations: int,
                           lr: Optional[float] = None, omp_threads: Optional[int] = None) -> Dict[str, str]:
    """Environment variables for nnU-Net and the package's trainers on a CPU, with nnU-Net's three folders
    under ``root`` (created). The one CPU set-up of the demo and the tests (docs/usage.md, "Running on CPU"):

    * ``nnUNet_n_proc_DA=0``: augmentation in the training process (faster than 3 workers on 2 cores);
    * ``nnUNet_def_n_proc=1``: one worker for the final validation (nnU-Net starts a pool of 8 otherwise);
    * ``nnUNet_compile=false``;
    * ``OMP_WAIT_POLICY=PASSIVE``: nnUNetv2_train on CPU gives torch one OpenMP thread per core; with two runs at
      a time, spin-waiting threads fight over the cores (measured: 40 iterations took 115 s instead of 9 s);
    * ``OMP_NUM_THREADS`` when ``omp_threads`` is given;
    * training length (``nnUNet_cimis_epochs``, ``_iterations``, ``_val_iterations``) and, when given,
      ``nnUNet_cimis_lr``; ``nnUNet_extTrainer`` lists the package's trainer folder.
    """
    from nnunetv2_cimis.trainer_folder import trainer_path
    root = os.path.abspath(root)
    env = {
        "nnUNet_raw": os.path.join(root, "raw"),
        "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
        "nnUNet_results": os.path.join(root, "results"),
        "nnUNet_extTrainer": trainer_path(),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
        ENV_EPOCHS: str(epochs),
        ENV_ITERATIONS: str(iterations),
        ENV_VAL_ITERATIONS: str(val_iterations),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    if lr:
        env[ENV_LR] = str(lr)
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[k], exist_ok=True)
    return env

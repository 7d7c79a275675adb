"""Finding, loading and checking the teacher of an incremental step.

The teacher of step t is the model trained on step t-1: ``checkpoint_final.pth`` in
``$nnUNet_results/<teacher dataset>/<trainer>__<plans>__<configuration>/fold_<fold>/``. The trainer name
comes from the step metadata (or is the student's own for steps >= 2); ``nnUNet_cimis_teacher`` may name a
checkpoint explicitly. The teacher network is built by the teacher trainer's own
``build_network_architecture`` from the plans and dataset.json stored with it, exactly as nnU-Net's
predictor does, then frozen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.safe_load import load_json_object, load_weights_only
from nnunetv2_cimis.settings import ENV_TEACHER


@dataclass
class LoadedTeacher:
    network: nn.Module
    checkpoint_path: str
    model_folder: str  # the <trainer>__<plans>__<configuration> folder
    trainer_name: str
    dataset_json: dict
    plans: dict
    init_args: dict = field(default_factory=dict)  # the checkpoint's init_args (configuration, fold, ...)


def model_folder_for(results_root: str, dataset: str, trainer: str, plans: str, configuration: str) -> str:
    return os.path.join(results_root, dataset, f"{trainer}__{plans}__{configuration}")


def teacher_results_name(trainer: str, teacher_step: int) -> str:
    """The trainer part of the teacher's results folder: ``trainer``, or with ``nnUNet_cimis_variant_folders=1``
    the variant name its training got under the same settings (:func:`nnunetv2_cimis.settings.results_trainer_name`
    applied to the teacher's class and step). Settings its class refuses (flat hyperparameters of another
    method) cannot have been used to train it and count as defaults."""
    from nnunetv2_cimis.settings import results_trainer_name, variant_folders_enabled
    if not variant_folders_enabled():
        return trainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_cimis.trainer_folder import ensure_trainer_path
    ensure_trainer_path()
    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer)
    except RuntimeError:
        raise CIMISError(f"The teacher was trained with {trainer}, which nnU-Net cannot find. Set "
                         f"nnUNet_extTrainer as for training (see `nnUNetv2_cimis_trainer_path`).") from None
    defaults = dict(getattr(trainer_class, "default_hyperparameters", {}) or {})
    default_lr = getattr(trainer_class, "incremental_initial_lr", None)
    try:
        return results_trainer_name(trainer, defaults, default_lr, teacher_step > 0)
    except CIMISError:
        return results_trainer_name(trainer, defaults, default_lr, teacher_step > 0, hp=defaults)


def teacher_checkpoint_path(results_root: Optional[str], dataset: str, trainer: str, plans: str,
                            configuration: str, fold, recorded: Optional[str] = None,
                            teacher_step: Optional[int] = None) -> str:
    """The teacher checkpoint: ``nnUNet_cimis_teacher`` if set, else the one recorded in the step metadata
    (``recorded``), else the conventional path: ``trainer``'s results folder, named as
    :func:`teacher_results_name` says when ``teacher_step`` (the teacher's step index) is given."""
    explicit = os.environ.get(ENV_TEACHER, "").strip()
    if not explicit and recorded:
        if not os.path.isfile(recorded):
            raise CIMISError(f"The teacher checkpoint recorded in the step metadata, {recorded}, does not exist. "
                             f"Set {ENV_TEACHER} to where that model's checkpoint_final.pth is now.")
        return recorded
    if explicit:
        if not os.path.isfile(explicit):
            raise CIMISError(f"{ENV_TEACHER}={explicit} does not exist. Point it at the previous step's "
                             f"checkpoint_final.pth, or unset it to use {trainer} on {dataset}.")
        return explicit
    if results_root is None:
        raise CIMISError("nnUNet_results is not set, so the teacher cannot be found. Set it as for nnU-Net.")
    folder_trainer = trainer if teacher_step is None else teacher_results_name(trainer, teacher_step)
    path = os.path.join(model_folder_for(results_root, dataset, folder_trainer, plans, configuration),
                        f"fold_{fold}", "checkpoint_final.pth")
    if not os.path.isfile(path):
        same = "" if folder_trainer == trainer else " with the same nnUNet_cimis_hparams / nnUNet_cimis_lr"
        raise CIMISError(
            f"The teacher checkpoint {path} does not exist. Train the previous step first "
            f"(`nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans}`{same}), or set "
            f"{ENV_TEACHER} to the checkpoint_final.pth of the model to extend.")
    return path


def load_teacher(checkpoint_path: str, device: torch.device) -> LoadedTeacher:
    """Build the teacher network from the files next to its checkpoint and load its weights (frozen, eval).

    Raises:
        CIMISError: unreadable checkpoint, or its model folder lacks plans.json / dataset.json.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_cimis.trainer_folder import ensure_trainer_path
    ensure_trainer_path()  # the teacher may have been trained by one of the package's trainers
    fold_folder = os.path.dirname(os.path.abspath(checkpoint_path))
    model_folder = os.path.dirname(fold_folder)
    ckpt = load_weights_only(checkpoint_path, "teacher checkpoint")
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise CIMISError(f"{checkpoint_path} is not an nnU-Net checkpoint (no 'network_weights').")
    files = {}
    for name in ("plans.json", "dataset.json"):
        p = os.path.join(model_folder, name)
        if not os.path.isfile(p):
            raise CIMISError(f"The teacher's model folder {model_folder} has no {name}; nnU-Net writes it when "
                             f"training starts. Is {checkpoint_path} inside a trained model folder?")
        files[name] = load_json_object(p, f"{name} of the teacher")
    plans, dataset_json = files["plans.json"], files["dataset.json"]
    trainer_name = ckpt.get("trainer_name", "nnUNetTrainer")
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    configuration = init_args.get("configuration")
    if not isinstance(plans.get("configurations"), dict) or configuration not in plans["configurations"]:
        raise CIMISError(f"The teacher checkpoint was trained with configuration {configuration!r}, which its "
                         f"plans do not define.")
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise CIMISError(f"The teacher was trained with {trainer_name}, which nnU-Net cannot find. Set "
                         f"nnUNet_extTrainer as for training (see `nnUNetv2_cimis_trainer_path`).") from None
    try:
        label_manager = plans_manager.get_label_manager(dataset_json)
        network = trainer_class.build_network_architecture(
            plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
            label_manager.num_segmentation_heads, True)
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as e:
        raise CIMISError(f"The plans.json / dataset.json of the teacher in {model_folder} do not describe a network "
                         f"nnU-Net can build ({type(e).__name__}: {e}); restore them as nnU-Net wrote them.") from None
    state = {k[7:] if k.startswith("module.") else k: v for k, v in ckpt["network_weights"].items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise CIMISError(f"The teacher checkpoint {checkpoint_path} does not match its own plans ({str(e)[:300]}).") from None
    network.to(device)
    freeze(network)
    return LoadedTeacher(network=network, checkpoint_path=checkpoint_path, model_folder=model_folder,
                         trainer_name=trainer_name, dataset_json=dataset_json, plans=plans, init_args=init_args)


def freeze(network: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good."""
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    # keep it in eval mode even if someone calls .train() on a parent
    network.train = lambda mode=True: network  # type: ignore[assignment]
    return network

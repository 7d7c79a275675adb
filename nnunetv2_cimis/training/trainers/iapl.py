"""nnU-Net trainer for IAPL (instance-adaptive prototype learning; Liang, Zhou et al., IJCAI 2024 /
arXiv 2507.07602): a prototype segmentation head on nnU-Net's planned encoder/decoder.

Not a continual method: the trainer subclasses ``nnUNetTrainer`` directly and keeps nnU-Net's planning,
data loading, training loop, validation and inference. It changes three things:

* ``build_network_architecture`` (static, also used by ``nnUNetv2_predict``) builds nnU-Net's U-Net with
  ``get_network_from_plans`` and wraps its encoder and decoder in
  :class:`nnunetv2_cimis.networks.iapl.IAPLNetwork`;
* ``_build_loss`` returns :class:`nnunetv2_cimis.losses.iapl.IAPLLoss` behind a small adapter that takes
  nnU-Net's deep-supervision lists (the network's list is ``[logits, intermediate log-probabilities...]``);
* ``on_train_epoch_start`` advances the foreground-filtering threshold with the epoch.

Hyperparameters (``default_hyperparameters``, overridden by ``nnUNet_cimis_hparams``): the table in
``docs/methods_iapl.md`` (checked against the dict by ``tests/test_docs_hyperparameters.py``). The architecture
ones are read again by the static ``build_network_architecture`` at inference: set the same
``nnUNet_cimis_hparams`` for ``nnUNetv2_predict`` as for training if you changed any of them.

Region-based training and ignore labels are not supported (the loss is one-hot per class).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.losses.iapl import IAPLLoss
from nnunetv2_cimis.networks.iapl import IAPLNetwork
from nnunetv2_cimis.networks.unwrap import unwrap_network
from nnunetv2_cimis.settings import apply_training_length, resolve_hyperparameters

#: hyperparameters that shape the network (passed to IAPLNetwork)
ARCHITECTURE_KEYS = ("num_queries", "layers_per_scale", "num_transformer_scales", "embed_dim", "num_heads",
                     "ffn_expansion", "head_channels", "prototype_embedding_dim", "purity_threshold_start",
                     "purity_threshold_end", "purity_ramp_fraction")


class IAPLDeepSupervisionLoss(nn.Module):
    """Adapter between nnU-Net's (output, target) calls and :class:`IAPLLoss`.

    ``output``: the network's list ``[logits, aux log-probs...]`` (deep supervision on) or the logits tensor;
    ``target``: nnU-Net's list of label maps over the deep-supervision scales (full resolution first) or one
    ``(B, 1, ...)`` map. Only the full-resolution target is used; the loss resizes it for the aux terms.
    """

    def __init__(self, loss: IAPLLoss):
        super().__init__()
        self.loss = loss

    def forward(self, output, target):
        if isinstance(output, (list, tuple)):
            logits, aux = output[0], list(output[1:])
        else:
            logits, aux = output, []
        if isinstance(target, (list, tuple)):
            target = target[0]
        return self.loss(logits, target, aux)


class nnUNetTrainerIAPL(nnUNetTrainer):
    """nnU-Net with the IAPL prototype head (see the module docstring)."""

    default_hyperparameters: Dict[str, Any] = {
        "num_queries": 32,
        "layers_per_scale": 2,
        "num_transformer_scales": 3,
        "embed_dim": 128,
        "num_heads": 8,
        "head_channels": 8,
        "ffn_expansion": 4,
        "prototype_embedding_dim": 128,
        "purity_threshold_start": 0.1,
        "purity_threshold_end": 0.5,
        "purity_ramp_fraction": 1.0,
        "aux_weight": 0.05,
        "bce_weight": 1.0,
        "dice_weight": 1.0,
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error():
            self.hp: Dict[str, Any] = resolve_hyperparameters(self.default_hyperparameters, self.__class__.__name__)
            apply_training_length(self)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        with exit_on_user_error():
            hp = resolve_hyperparameters(nnUNetTrainerIAPL.default_hyperparameters, "nnUNetTrainerIAPL")
            unet = get_network_from_plans(
                configuration_manager.network_arch_class_name,
                configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import,
                num_input_channels, num_output_channels, allow_init=True,
                deep_supervision=enable_deep_supervision)
            try:
                return IAPLNetwork(unet, num_output_channels, **{k: hp[k] for k in ARCHITECTURE_KEYS})
            except ValueError as e:
                raise CIMISError(f"cannot build the IAPL network from plans "
                                 f"{plans_manager.plans_name}: {e} (set it with nnUNet_cimis_hparams)") from None

    def _build_loss(self):
        with exit_on_user_error():
            if self.label_manager.has_regions:
                raise CIMISError("nnUNetTrainerIAPL does not support region-based training (its loss is one-hot "
                                 "per class); use a dataset with plain labels")
            if self.label_manager.ignore_label is not None:
                raise CIMISError("nnUNetTrainerIAPL does not support an ignore label; remove it from dataset.json")
            loss = IAPLLoss(self.label_manager.num_segmentation_heads, aux_weight=self.hp["aux_weight"],
                            bce_weight=self.hp["bce_weight"], dice_weight=self.hp["dice_weight"])
        return IAPLDeepSupervisionLoss(loss)

    def training_progress(self) -> float:
        """Epoch / (epochs - 1), in [0, 1]: the position of the purity-threshold ramp."""
        return min(1.0, self.current_epoch / max(1, self.num_epochs - 1))

    def on_train_epoch_start(self):
        threshold = unwrap_network(self.network).set_training_progress(self.training_progress())
        super().on_train_epoch_start()
        self.print_to_log_file(f"IAPL foreground-filter purity threshold: {threshold:.3f}")

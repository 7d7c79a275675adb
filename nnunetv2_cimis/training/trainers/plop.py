"""PLOP trainer: local POD distillation + entropy pseudo-labels (Douillard et al., CVPR 2021).

Loss of a step t > 0 (see :mod:`nnunetv2_cimis.losses.plop`):

    L = sum_s w_s PseudoDiceCE(z_s, pseudo_s, image weights_s)
        + sqrt(n_total / n_new) * ( sum_l pod_feature_weight * POD(F_l) + pod_logits_weight * sum_s w_s POD(z_s) )
          / (n_feature_maps + 1)

* ``w_s``: nnU-Net's deep-supervision weights (from its ``DeepSupervisionWrapper``). Pseudo-labels are made at
  every scale from the teacher's output and nnU-Net's target at that scale.
* Pseudo-labels: label-0 voxels take the teacher's argmax where its normalised entropy is below the
  class's threshold, others are ignored; each image's CE is weighted by its fraction of confident label-0
  voxels. The per-class thresholds (median entropy, floor ``entropy_threshold_floor``) are computed once
  in :meth:`on_incremental_train_start` from ``threshold_num_batches`` training batches (highest
  resolution), stored in the checkpoint (``cimis_state``) and reused on ``--c``.
* POD: on the squared outputs of the feature taps (default: every encoder stage but the first, and the
  last decoder stage, the counterpart of PLOP's ResNet stages + ASPP output) and on the logits (new-class
  logits summed into background). Regions: scales ``pod_scales`` along the longest physical axis of the
  patch (patch size x spacing), proportionally fewer along shorter axes (``pod_physical_regions``).

Hyperparameters (``default_hyperparameters``, overridden by ``nnUNet_cimis_hparams``): the table in
``docs/trainers_baselines.md`` (checked against the dict by ``tests/test_docs_hyperparameters.py``).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.losses.plop import PLOPDistillationLoss, PLOPPseudoLabeller, PseudoLabelDiceCELoss
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental

PSEUDO_IGNORE = -100


class nnUNetTrainerPLOP(nnUNetTrainerIncremental):
    """PLOP: pseudo-labelled Dice+CE with per-image weights + local POD on features and logits."""

    default_hyperparameters = {
        "pod_feature_weight": 0.01, "pod_logits_weight": 0.0005, "pod_scales": [1, 2, 4], "pod_class_schedule": True,
        "pod_physical_regions": True, "pod_feature_taps": "auto", "entropy_threshold_floor": 0.001,
        "entropy_num_bins": 100, "threshold_num_batches": 0, "min_image_weight": 0.0, "dice_weight": 1.0,
    }

    def build_method_losses(self) -> None:
        """Feature taps, pseudo-labeller and losses for this step, from ``self.hp`` and the plans."""
        self.pseudo_labeller = self.pseudo_label_loss = self.pod_loss = None
        self.pod_tap_names: List[str] = []
        if not self.step.is_incremental:
            return
        if not isinstance(self.hp["threshold_num_batches"], int) or self.hp["threshold_num_batches"] < 0:
            raise ValueError(f"threshold_num_batches must be an integer >= 0 (0 = one epoch), got "
                             f"{self.hp['threshold_num_batches']!r}")
        paths = self._pod_tap_paths()
        self.pod_tap_names = [f"pod{i}" for i in range(len(paths))]
        self.student_feature_taps = self.teacher_feature_taps = dict(zip(self.pod_tap_names, paths))  # base installs
        n_old = self.step.n_old_outputs
        self.pseudo_labeller = PLOPPseudoLabeller(
            n_old, num_bins=int(self.hp["entropy_num_bins"]), threshold_floor=self.hp["entropy_threshold_floor"],
            ignore_index=PSEUDO_IGNORE, min_image_weight=self.hp["min_image_weight"]).to(self.device)
        self.pseudo_label_loss = PseudoLabelDiceCELoss(
            weight_ce=1.0, weight_dice=self.hp["dice_weight"], batch_dice=self.configuration_manager.batch_dice,
            include_background=False, ignore_index=PSEUDO_IGNORE)
        self.pod_loss = PLOPDistillationLoss(
            n_old, self.label_manager.num_segmentation_heads, feature_weight=self.hp["pod_feature_weight"],
            logits_weight=self.hp["pod_logits_weight"], scales=self._pod_scales(), extent=self._patch_extent(),
            class_schedule=self.hp["pod_class_schedule"])

    def _pod_tap_paths(self) -> List[str]:
        taps = self.hp["pod_feature_taps"]
        if taps == "auto":
            n_stages = self.configuration_manager.network_arch_init_kwargs.get("n_stages")
            if not isinstance(n_stages, int) or n_stages < 2:
                return ["encoder.stages.-1", "decoder.stages.-1"]
            return [f"encoder.stages.{i}" for i in range(1, n_stages)] + ["decoder.stages.-1"]
        if not isinstance(taps, list) or not all(isinstance(t, str) for t in taps):
            raise CIMISError(f"hyperparameter pod_feature_taps of {self.__class__.__name__} must be \"auto\" or a "
                             f"list of module paths such as [\"encoder.stages.-1\"], got {taps!r}")
        return list(taps)

    def _pod_scales(self):
        scales = self.hp["pod_scales"]
        if not isinstance(scales, list) or not scales:
            raise CIMISError(f"hyperparameter pod_scales must be a non-empty list such as [1, 2, 4], got {scales!r}")
        return [tuple(s) if isinstance(s, list) else s for s in scales]

    def _patch_extent(self):
        if not self.hp["pod_physical_regions"]:
            return None
        patch = list(self.configuration_manager.patch_size)
        spacing = list(self.configuration_manager.spacing)
        if len(spacing) != len(patch):
            spacing = spacing[-len(patch):] if len(spacing) > len(patch) else [1.0] * len(patch)
        return [p * s for p, s in zip(patch, spacing)]

    def on_incremental_train_start(self) -> None:
        if self.pseudo_labeller.has_thresholds:
            self.print_to_log_file(f"PLOP entropy thresholds restored from the checkpoint: "
                                   f"{self.pseudo_labeller.thresholds.tolist()}")
            return
        self.compute_entropy_thresholds()

    @torch.no_grad()
    def compute_entropy_thresholds(self) -> torch.Tensor:
        """Median teacher entropy per class over training batches (full resolution), once per step."""
        n_batches = int(self.hp["threshold_num_batches"]) or self.num_iterations_per_epoch
        self.pseudo_labeller.reset()
        self.teacher.eval()
        for _ in range(n_batches):
            batch = next(self.dataloader_train)
            target = batch["target"]
            target = (target[0] if isinstance(target, (list, tuple)) else target).to(self.device, non_blocking=True)
            logits, _ = self.teacher_forward(batch["data"].to(self.device, non_blocking=True))
            self.pseudo_labeller.accumulate(logits[0], self._nnunet_ignore_to_pseudo(target))
        if self.is_ddp:
            torch.distributed.all_reduce(self.pseudo_labeller.histogram)
        thresholds = self.pseudo_labeller.compute_thresholds()
        self.print_to_log_file(f"PLOP entropy thresholds from {n_batches} batches (per old channel, background "
                               f"first): {[round(float(t), 4) for t in thresholds]}")
        return thresholds

    def _nnunet_ignore_to_pseudo(self, target: torch.Tensor) -> torch.Tensor:
        ignore = self.label_manager.ignore_label
        if ignore is None:
            return target
        return torch.where(target == ignore, torch.full_like(target, PSEUDO_IGNORE), target)

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        if self.pseudo_labeller is None:
            return {}
        return {"pseudo_labeller": {k: v.detach().cpu() for k, v in self.pseudo_labeller.state_dict().items()}}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if self.pseudo_labeller is not None and "pseudo_labeller" in state:
            self.pseudo_labeller.load_state_dict(state["pseudo_labeller"])

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        def pseudo_dice_ce(z, y, z_teacher):
            pseudo, image_weights = self.pseudo_labeller(z_teacher, self._nnunet_ignore_to_pseudo(y))
            return self.pseudo_label_loss(z, pseudo, image_weights)

        seg = self.over_scales(pseudo_dice_ce, output, target, ctx.teacher_output)
        pod = self.pod_loss([ctx.student_features[k] for k in self.pod_tap_names],
                            [ctx.teacher_features[k] for k in self.pod_tap_names],
                            output, ctx.teacher_output, scale_weights=self.deep_supervision_weights)
        self.record_loss_terms(segmentation=seg, pod=pod)
        return seg + pod

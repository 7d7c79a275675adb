"""nnU-Net trainers for PGCD and DAPD (Zhu et al., "Prototype-guided calibration distillation and
dual-aligned prototype distillation for class-incremental medical image segmentation", arXiv 2511.07749).

Three trainers, one implementation, differing only in their default hyperparameters. One iteration of a step
t > 0: MiB's unbiased Dice+CE; at the prototype tap, the old-class regions (label 0, teacher argmax) and the
teacher's local prototypes on them (background: an EMA, kept in the checkpoint); global prototypes from the
teacher's step memory; PGCD: calibration weights from cos(teacher feature, global prototype) in a
background-aware KL at every scale; DAPD: the student's local prototypes aligned with the global and the
teacher's local ones. At step 0 they train like nnU-Net. Method and hyperparameters: ``docs/methods_pgcd_dapd.md``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.losses.common import resize_labels_nearest
from nnunetv2_cimis.losses.dapd import DualAlignedPrototypeDistillation
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.losses.pgcd import PrototypeChannelFeatureDistillation, PrototypeGuidedCalibrationDistillation
from nnunetv2_cimis.losses.prototypes import EMAPrototype, class_masks, local_prototypes, old_class_regions
from nnunetv2_cimis.memory.compute import DEFAULT_PROTOTYPE_TAP
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental

TAP = "proto"
_NON_NEGATIVE = ("pgcd_weight", "pgcd_feature_weight", "dapd_weight", "dapd_global_weight", "dapd_local_weight")


class nnUNetTrainerPGCDDAPD(nnUNetTrainerIncremental):
    """The full method: unbiased Dice+CE + ``pgcd_weight`` * PGCD + ``dapd_weight`` * DAPD."""

    method_name = "PGCD/DAPD"
    needs_teacher_memory = True
    default_hyperparameters: Dict[str, Any] = {
        "prototype_tap": DEFAULT_PROTOTYPE_TAP, "pgcd_weight": 10.0, "pgcd_weighting": "softmax",
        "pgcd_temperature": 0.5, "pgcd_divergence": "binary", "pgcd_feature_weight": 0.0, "dapd_weight": 1.0,
        "dapd_global_weight": 1.0, "dapd_local_weight": 1.0, "dapd_min_voxels": 1, "old_region_confidence": 0.0,
        "background_momentum": 0.99,
    }

    def build_method_losses(self) -> None:
        """Losses, taps, EMA background prototype (the unbiased Dice+CE: in :meth:`on_incremental_train_start`)."""
        hp = self.hp
        for name in _NON_NEGATIVE:
            if not isinstance(hp[name], (int, float)) or isinstance(hp[name], bool) or hp[name] < 0:
                raise CIMISError(f"hyperparameter {name} must be a number >= 0, got {hp[name]!r}")
        self.pgcd = PrototypeGuidedCalibrationDistillation(weighting=hp["pgcd_weighting"],
                                                           temperature=hp["pgcd_temperature"],
                                                           divergence=hp["pgcd_divergence"])
        self.pgcd_feature = PrototypeChannelFeatureDistillation()
        self.dapd = DualAlignedPrototypeDistillation(global_weight=hp["dapd_global_weight"],
                                                     local_weight=hp["dapd_local_weight"],
                                                     min_voxels=hp["dapd_min_voxels"])
        if not 0.0 <= float(hp["old_region_confidence"]) <= 1.0:
            raise ValueError(f"old_region_confidence must be in [0, 1], got {hp['old_region_confidence']}")
        self.background_prototype = EMAPrototype(float(hp["background_momentum"]))
        self.memory_prototype_tap = str(hp["prototype_tap"])
        self.student_feature_taps = self.teacher_feature_taps = {TAP: self.memory_prototype_tap}
        self.unbiased_segmentation = self._old_prototypes = self._old_prototype_valid = None

    def on_incremental_train_start(self) -> None:
        """Global prototypes of the old classes from the teacher's step memory; the unbiased Dice+CE."""
        n_old = self.step.n_old_outputs
        self._old_prototypes, self._old_prototype_valid = self.teacher_memory_prototypes("prototype_tap")
        if not self.background_prototype.is_set and bool(self._old_prototype_valid[0]):
            self.background_prototype.initialize(self._old_prototypes[0])
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        self.unbiased_segmentation = UnbiasedDiceCELoss(n_old, batch_dice=self.configuration_manager.batch_dice,
                                                        ignore_index=ignore)
        missing = [v for v in range(1, n_old) if not bool(self._old_prototype_valid[v])]
        note = f" (none for {missing}: PGCD weight 1, DAPD local alignment only)" if missing else ""
        background = "from checkpoint/memory" if self.background_prototype.is_set else "from the first batch"
        self.print_to_log_file(f"PGCD/DAPD: {n_old - 1 - len(missing)} of {n_old - 1} old classes have a global "
                               f"prototype{note}; background prototype {background}")

    def current_global_prototypes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(n_old, C)`` global prototypes (row 0 = the EMA background prototype when set) and validity."""
        prototypes, valid = self._old_prototypes.clone(), self._old_prototype_valid.clone()
        if self.background_prototype.is_set:
            prototypes[0] = self.background_prototype.value.to(prototypes.device)
            valid[0] = True
        return prototypes, valid

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        with exit_on_user_error():
            hp, n_old = self.hp, self.step.n_old_outputs
            f_teacher, f_student = ctx.teacher_features[TAP], ctx.student_features[TAP]
            if self._old_prototypes.shape[1] != f_teacher.shape[1]:
                raise CIMISError(f"The step memory's prototypes have {self._old_prototypes.shape[1]} channels but the "
                                 f"features at '{hp['prototype_tap']}' have {f_teacher.shape[1]}: teacher and student "
                                 f"must share the plans (and the tap) of the step that wrote the memory.")
        terms = {"segmentation": self.over_scales(self.unbiased_segmentation, output, target)}
        teacher_logits, labels = _at_feature_resolution(ctx.teacher_output, target, f_teacher.shape[2:])
        regions = old_class_regions(labels, teacher_logits, float(hp["old_region_confidence"]))
        masks = class_masks(regions, list(range(n_old)))
        with torch.no_grad():
            teacher_local, counts = local_prototypes(f_teacher, masks)
        self.background_prototype.update(teacher_local[0], counts[0])
        prototypes, valid = self.current_global_prototypes()
        if hp["pgcd_weight"] > 0:
            weights = self.pgcd.calibration_weights(f_teacher, prototypes, valid)
            terms["pgcd"] = self.over_scales(lambda s, t: self.pgcd(s, t, weights), output, ctx.teacher_output)
        if hp["pgcd_feature_weight"] > 0:
            terms["pgcd_feature"] = self.pgcd_feature(f_student, f_teacher, prototypes, valid)
        if hp["dapd_weight"] > 0:
            student_local, _ = local_prototypes(f_student, masks)
            terms["dapd"] = self.dapd.prototype_loss(student_local, teacher_local, counts, prototypes, valid)
        self.record_loss_terms(**terms)  # weighted sum, in this order: seg + pgcd_weight * pgcd + ... (term_weight)
        return sum(v * (1.0 if k == "segmentation" else hp[f"{k}_weight"]) for k, v in terms.items())

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"background_prototype": self.background_prototype.state_dict()}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if "background_prototype" in state:
            self.background_prototype.load_state_dict(state["background_prototype"])

    def extend_step_memory(self, memory: StepMemory) -> None:
        if self.background_prototype.is_set:
            memory.extra["pgcd_dapd_background_prototype"] = self.background_prototype.value.detach().cpu()


def _at_feature_resolution(teacher_output: List[torch.Tensor], target: List[torch.Tensor],
                           size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and labels at the feature map's size: the deep-supervision scale of that size if there is
    one (decoder stage k has the size of output k), else resized (linear / nearest)."""
    size = tuple(size)
    for t_out, tgt in zip(teacher_output, target):
        if tuple(t_out.shape[2:]) == size and tuple(tgt.shape[2:]) == size:
            return t_out, tgt
    mode = "bilinear" if len(size) == 2 else "trilinear"
    t_out = F.interpolate(teacher_output[0].float(), size=size, mode=mode, align_corners=False)
    return t_out, resize_labels_nearest(target[0], size)


class nnUNetTrainerPGCD(nnUNetTrainerPGCDDAPD):
    """PGCD alone: unbiased Dice+CE + calibrated distillation (``dapd_weight = 0``)."""

    default_hyperparameters = {**nnUNetTrainerPGCDDAPD.default_hyperparameters, "dapd_weight": 0.0}


class nnUNetTrainerDAPD(nnUNetTrainerPGCDDAPD):
    """DAPD alone: unbiased Dice+CE + MiB's unbiased distillation (uniform weights, categorical KL) + DAPD."""

    default_hyperparameters = {**nnUNetTrainerPGCDDAPD.default_hyperparameters, "pgcd_weighting": "uniform",
                               "pgcd_divergence": "categorical"}

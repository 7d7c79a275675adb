"""nnU-Net trainers for PGCD and DAPD (Zhu et al., "Prototype-guided calibration distillation and
dual-aligned prototype distillation for class-incremental medical image segmentation", arXiv 2511.07749).

Three trainers, one implementation (they differ only in their default hyperparameters):

=========================  =====================================================================================
``nnUNetTrainerPGCDDAPD``  the full method: unbiased Dice+CE + ``pgcd_weight`` * PGCD + ``dapd_weight`` * DAPD
``nnUNetTrainerPGCD``      PGCD alone: ``dapd_weight = 0``
``nnUNetTrainerDAPD``      DAPD alone: ``pgcd_weighting = "uniform"``, ``pgcd_divergence = "categorical"`` (the
                           distillation term stays, without calibration: MiB's unbiased distillation, KL form)
=========================  =====================================================================================

Usage: ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerPGCDDAPD`` on a step dataset (step > 0; at step 0
the trainers train like nnU-Net and write the step memory the next step needs).

What one training iteration of a step t > 0 does (see ``docs/methods_pgcd_dapd.md``):

1. segmentation: MiB's unbiased Dice+CE over the deep-supervision scales (label 0 = background or an old class);
2. at the prototype tap (default ``decoder.stages.-2``, the resolution of deep-supervision scale 1), the
   old-class regions: voxels labelled 0, with the teacher's argmax (optionally above a confidence);
3. the teacher's local prototypes of background and old classes on those regions (summed over DDP ranks);
   the background one updates the EMA background prototype (kept in the checkpoint);
4. global prototypes = the teacher's step memory for the old classes, the EMA for background;
5. PGCD: calibration weights from cos(teacher feature, global prototype), a weighted background-aware KL
   between teacher and student at every deep-supervision scale (weights resized by nearest neighbour);
6. DAPD: the student's local prototypes on the same regions aligned with the global and the teacher's local ones.

Hyperparameters (``nnUNet_cimis_hparams`` overrides them; every value is this package's choice, the paper does
not publish its constants; ``docs/methods_pgcd_dapd.md`` says why):

=========================  ===========  =====================================================================
name                       default      meaning
=========================  ===========  =====================================================================
prototype_tap              decoder.     module path of the prototype features; must equal the teacher's step
                           stages.-2    memory's ``prototype_tap``
pgcd_weight                10.0         lambda_1 (MiB's distillation weight, same per-channel normalisation)
pgcd_weighting             softmax      ``softmax`` / ``sigmoid`` / ``uniform`` (see losses/pgcd.py)
pgcd_temperature           0.5          temperature over cosine similarities
pgcd_divergence            binary       ``binary`` (per-class binary KL, minimum at the teacher) or
                                        ``categorical`` (class terms of the KL; MiB's with uniform weights)
pgcd_feature_weight        0.0          weight of the channel-weighted feature term (off)
dapd_weight                1.0          lambda_2
dapd_global_weight         1.0          weight of the student-to-global alignment inside DAPD
dapd_local_weight          1.0          weight of the student-to-teacher-local alignment inside DAPD
dapd_min_voxels            1            voxels (feature resolution, whole batch) a class needs to take part
old_region_confidence      0.0          teacher probability needed for a label-0 voxel to count as its
                                        argmax class (0 = argmax only)
background_momentum        0.99         EMA momentum of the background prototype
=========================  ===========  =====================================================================
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.losses.common import resize_labels_nearest
from nnunetv2_cimis.losses.dapd import DualAlignedPrototypeDistillation
from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.losses.pgcd import PrototypeChannelFeatureDistillation, PrototypeGuidedCalibrationDistillation
from nnunetv2_cimis.losses.prototypes import EMAPrototype, class_masks, local_prototypes, old_class_regions
from nnunetv2_cimis.memory.compute import DEFAULT_PROTOTYPE_TAP
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental

TAP = "proto"
_NON_NEGATIVE = ("pgcd_weight", "pgcd_feature_weight", "dapd_weight", "dapd_global_weight", "dapd_local_weight")
_LOGGED_TERMS = ("segmentation", "pgcd", "pgcd_feature", "dapd")


class nnUNetTrainerPGCDDAPD(nnUNetTrainerIncremental):
    """PGCD + DAPD (see the module docstring)."""

    needs_teacher_memory = True
    default_hyperparameters: Dict[str, Any] = {
        "prototype_tap": DEFAULT_PROTOTYPE_TAP,
        "pgcd_weight": 10.0,
        "pgcd_weighting": "softmax",
        "pgcd_temperature": 0.5,
        "pgcd_divergence": "binary",
        "pgcd_feature_weight": 0.0,
        "dapd_weight": 1.0,
        "dapd_global_weight": 1.0,
        "dapd_local_weight": 1.0,
        "dapd_min_voxels": 1,
        "old_region_confidence": 0.0,
        "background_momentum": 0.99,
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error():
            self._build_method_losses()
        tap = str(self.hp["prototype_tap"])
        self.student_feature_taps = {TAP: tap}
        self.teacher_feature_taps = {TAP: tap}
        self.memory_prototype_tap = tap
        self.background_prototype = EMAPrototype(float(self.hp["background_momentum"]))
        self.unbiased_segmentation: Optional[UnbiasedDiceCELoss] = None
        self._old_prototypes: Optional[torch.Tensor] = None
        self._old_prototype_valid: Optional[torch.Tensor] = None
        self._term_sums: Dict[str, torch.Tensor] = {}
        self._term_iterations = 0

    def _build_method_losses(self) -> None:
        hp = self.hp
        for name in _NON_NEGATIVE:
            if not isinstance(hp[name], (int, float)) or isinstance(hp[name], bool) or hp[name] < 0:
                raise CIMISError(f"hyperparameter {name} must be a number >= 0, got {hp[name]!r}")
        try:
            self.pgcd = PrototypeGuidedCalibrationDistillation(weighting=hp["pgcd_weighting"],
                                                               temperature=hp["pgcd_temperature"],
                                                               divergence=hp["pgcd_divergence"])
            self.pgcd_feature = PrototypeChannelFeatureDistillation()
            self.dapd = DualAlignedPrototypeDistillation(global_weight=hp["dapd_global_weight"],
                                                         local_weight=hp["dapd_local_weight"],
                                                         min_voxels=hp["dapd_min_voxels"])
            EMAPrototype(float(hp["background_momentum"]))
            if not 0.0 <= float(hp["old_region_confidence"]) <= 1.0:
                raise ValueError(f"old_region_confidence must be in [0, 1], got {hp['old_region_confidence']}")
        except (ValueError, TypeError) as e:
            raise CIMISError(f"Bad hyperparameter of {self.__class__.__name__}: {e}. "
                             f"Fix nnUNet_cimis_hparams.") from None

    # ------------------------------------------------------------------ set-up
    def on_incremental_train_start(self) -> None:
        memory = self.teacher_memory
        n_old = self.step.n_old_outputs
        self._old_prototypes, self._old_prototype_valid = self._global_prototypes_from_memory(memory, n_old)
        if not self.background_prototype.is_set and bool(self._old_prototype_valid[0]):
            self.background_prototype.initialize(self._old_prototypes[0])
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        self.unbiased_segmentation = UnbiasedDiceCELoss(n_old, batch_dice=self.configuration_manager.batch_dice,
                                                        ignore_index=ignore)
        missing = [v for v in range(1, n_old) if not bool(self._old_prototype_valid[v])]
        background = "from checkpoint/memory" if self.background_prototype.is_set else "from the first batch"
        self.print_to_log_file(
            f"PGCD/DAPD: {n_old - 1 - len(missing)} of {n_old - 1} old classes have a global prototype"
            + (f" (none for {missing}: PGCD weight 1, DAPD local alignment only)" if missing else "")
            + f"; background prototype {background}")

    def _global_prototypes_from_memory(self, memory: Optional[StepMemory],
                                       n_old: int) -> Tuple[torch.Tensor, torch.Tensor]:
        tap = self.hp["prototype_tap"]
        if memory is None:
            raise CIMISError("PGCD/DAPD need the teacher's step memory (global prototypes of the old classes), "
                             "but none was loaded.")
        if memory.prototype_tap != tap:
            raise CIMISError(
                f"The teacher's step memory holds prototypes of '{memory.prototype_tap}' but this trainer's "
                f"prototype_tap is '{tap}'. Use the same tap (nnUNet_cimis_hparams '{{\"prototype_tap\": "
                f"\"{memory.prototype_tap}\"}}'), or recompute the teacher's memory with that tap.")
        if memory.num_labels < n_old:
            raise CIMISError(f"The teacher's step memory has prototypes for labels 0..{memory.num_labels - 1} but the "
                             f"teacher has {n_old} outputs; recompute it with nnUNetv2_cimis_step_memory.")
        prototypes = memory.prototypes[:n_old].detach().float().to(self.device)
        valid = (memory.prototype_counts[:n_old] > 0).to(self.device)
        return prototypes, valid

    def current_global_prototypes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(n_old, C)`` global prototypes (row 0 = the EMA background prototype when set) and validity."""
        prototypes, valid = self._old_prototypes.clone(), self._old_prototype_valid.clone()
        if self.background_prototype.is_set:
            prototypes[0] = self.background_prototype.value.to(prototypes.device)
            valid[0] = True
        return prototypes, valid

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        with exit_on_user_error():
            return self._compute_loss(output, target, ctx)

    def _compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        hp = self.hp
        n_old = self.step.n_old_outputs
        scale_weights = deep_supervision_weights(len(output))
        seg = apply_over_scales(self.unbiased_segmentation, scale_weights, output, target)

        if ctx.teacher_output is None or TAP not in ctx.teacher_features or TAP not in ctx.student_features:
            raise CIMISError("PGCD/DAPD need the teacher's outputs and the prototype features of teacher and student "
                             "in every training iteration, but the base trainer did not provide them.")
        f_teacher, f_student = ctx.teacher_features[TAP], ctx.student_features[TAP]
        if self._old_prototypes.shape[1] != f_teacher.shape[1]:
            raise CIMISError(f"The step memory's prototypes have {self._old_prototypes.shape[1]} channels but the "
                             f"features at '{hp['prototype_tap']}' have {f_teacher.shape[1]}: teacher and student "
                             f"must share the plans (and the tap) of the step that wrote the memory.")
        teacher_logits, labels = self._at_feature_resolution(ctx.teacher_output, target, f_teacher.shape[2:])
        regions = old_class_regions(labels, teacher_logits, float(hp["old_region_confidence"]))
        masks = class_masks(regions, list(range(n_old)))
        with torch.no_grad():
            teacher_local, counts = local_prototypes(f_teacher, masks)
        self.background_prototype.update(teacher_local[0], counts[0])
        prototypes, valid = self.current_global_prototypes()

        terms = {"segmentation": seg.detach()}
        loss = seg
        if hp["pgcd_weight"] > 0:
            weights = self.pgcd.calibration_weights(f_teacher, prototypes, valid)
            kd = apply_over_scales(lambda s, t: self.pgcd(s, t, weights), scale_weights, output, ctx.teacher_output)
            loss = loss + hp["pgcd_weight"] * kd
            terms["pgcd"] = kd.detach()
        if hp["pgcd_feature_weight"] > 0:
            feat = self.pgcd_feature(f_student, f_teacher, prototypes, valid)
            loss = loss + hp["pgcd_feature_weight"] * feat
            terms["pgcd_feature"] = feat.detach()
        if hp["dapd_weight"] > 0:
            student_local, _ = local_prototypes(f_student, masks)
            dapd = self.dapd.prototype_loss(student_local, teacher_local, counts, prototypes, valid)
            loss = loss + hp["dapd_weight"] * dapd
            terms["dapd"] = dapd.detach()
        self._record_terms(terms)
        return loss

    @staticmethod
    def _at_feature_resolution(teacher_output: List[torch.Tensor], target: List[torch.Tensor],
                               size) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits and labels at the feature map's size: the deep-supervision scale of that size if
        there is one (decoder stage k has the size of output k), else resized (linear / nearest)."""
        size = tuple(size)
        for t_out, tgt in zip(teacher_output, target):
            if tuple(t_out.shape[2:]) == size and tuple(tgt.shape[2:]) == size:
                return t_out, tgt
        mode = "bilinear" if len(size) == 2 else "trilinear"
        t_out = F.interpolate(teacher_output[0].float(), size=size, mode=mode, align_corners=False)
        return t_out, resize_labels_nearest(target[0], size)

    def _record_terms(self, terms: Dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self._term_sums[k] = self._term_sums.get(k, 0.0) + v.float()
        self._term_iterations += 1

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        if self._term_iterations:
            parts = ", ".join(f"{k} {float(self._term_sums[k]) / self._term_iterations:.4f}"
                              for k in _LOGGED_TERMS if k in self._term_sums)
            self.print_to_log_file(f"PGCD/DAPD mean terms this epoch: {parts}")
        self._term_sums, self._term_iterations = {}, 0

    # ------------------------------------------------------------------ state
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"background_prototype": self.background_prototype.state_dict()}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if "background_prototype" in state:
            self.background_prototype.load_state_dict(state["background_prototype"])

    def extend_step_memory(self, memory: StepMemory) -> None:
        if self.background_prototype.is_set:
            memory.extra["pgcd_dapd_background_prototype"] = self.background_prototype.value.detach().cpu()


class nnUNetTrainerPGCD(nnUNetTrainerPGCDDAPD):
    """PGCD alone: unbiased Dice+CE + calibrated distillation (``dapd_weight = 0``)."""

    default_hyperparameters = {**nnUNetTrainerPGCDDAPD.default_hyperparameters, "dapd_weight": 0.0}


class nnUNetTrainerDAPD(nnUNetTrainerPGCDDAPD):
    """DAPD alone: unbiased Dice+CE + MiB's unbiased distillation (uniform weights, categorical KL) + DAPD."""

    default_hyperparameters = {**nnUNetTrainerPGCDDAPD.default_hyperparameters, "pgcd_weighting": "uniform",
                               "pgcd_divergence": "categorical"}

"""DDCL trainer: diffusion-driven distillation + cross-image pixel contrast (Zhao et al., IJCARS 2025).

"Diffusion-driven distillation and contrastive learning for class-incremental semantic segmentation of
laparoscopic images". A 2D method (nnU-Net ``2d`` configuration); method and hyperparameters (the table is checked
against the dict by ``tests/test_docs_hyperparameters.py``): ``docs/methods_ddcl.md``.

When a step ends, a DDPM is trained on the step's training images and listed in its step memory; at a later step,
images sampled from every listed model (:mod:`nnunetv2_cimis.training.diffusion_replay`) are appended to every
training batch (:meth:`replay_batch`). Loss of an iteration (real samples ``R``, all samples ``A``)::

    L = DiceCE_ds(R) + kd_weight * UNKD_ds(A) + contrast_weight * InfoNCE(projection(tap features), labels)

``DiceCE_ds``: at steps > 0 MiB's unbiased Dice+CE (label 0 = background or an old organ, which a step's
masks never label), at step 0 nnU-Net's Dice+CE; real samples only. ``UNKD_ds``: MiB's unbiased distillation
at every deep-supervision scale (on synthetic images: the old classes' knowledge on old-looking
data). ``InfoNCE``: cross-image pixel contrast on the embeddings of a
projection head (kept in the trainer, not the network) with class-wise queues; labels are the ground truth
and, on pixels labelled 0, the teacher's confident old-class predictions. At step 0 the contrast uses the
ground truth only (``method_loss_at_step0``). Head, queues and the cache folder are in the checkpoint.
The defaults are sized for the method on real data; the CPU demo passes smaller values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nnunetv2_cimis.errors import exit_on_user_error
from nnunetv2_cimis.losses.contrastive import labels_for_contrast
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.synthesis.diffusion import require_diffusers
from nnunetv2_cimis.training.diffusion_replay import (add_step_replay_model, check_replay_hyperparameters,
                                                      random_replay_images, sample_replay_images,
                                                      teacher_replay_models)
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental
from nnunetv2_cimis.training.pixel_contrast import PixelContrastTerm, tap_channels


class nnUNetTrainerDDCL(nnUNetTrainerIncremental):
    """Diffusion-driven distillation + cross-image contrast (see module docstring)."""

    method_name = "DDCL"
    spatial_dims = (2,)  # its replay model generates 2D images
    needs_teacher_memory = True
    method_loss_at_step0 = True  # the contrast term also trains step 0 (ground truth only)
    default_hyperparameters: Dict[str, Any] = {
        "kd_weight": 10.0, "kd_alpha": 1.0, "contrast_weight": 0.1, "contrast_temperature": 0.07,
        "contrast_tap": "decoder.stages.-1", "contrast_embedding_dim": 32, "contrast_anchors_per_class": 64,
        "contrast_queue_size": 500, "contrast_queue_pixels_per_image": 10, "pseudo_label_confidence": 0.5,
        "synthetic_per_batch": 1, "num_synthetic": 1000, "diffusion_image_size": 128,
        "diffusion_channels": [64, 128, 256, 256], "diffusion_train_iterations": 50000, "diffusion_batch_size": 16,
        "diffusion_learning_rate": 1e-4, "diffusion_crops_per_case": 8, "diffusion_sampling_steps": 25,
        "diffusion_prediction_type": "epsilon", "diffusion_seed": 0, "missing_replay_model": "error",
    }

    def check_method_requirements(self) -> None:
        require_diffusers()  # fail before training, not when the step's diffusion model is trained at its end

    def build_method_losses(self) -> None:
        hp = self.hp
        check_replay_hyperparameters(hp)
        for k in ("kd_weight", "contrast_weight"):
            if float(hp[k]) < 0:
                raise ValueError(f"hyperparameter {k} must be >= 0, got {hp[k]}")
        self.uses_contrast = float(hp["contrast_weight"]) > 0
        if self.uses_contrast:  # installed by the base (at step 0 too: method_loss_at_step0)
            self.student_feature_taps = {"contrast": str(hp["contrast_tap"])}
        self.distillation = (UnbiasedKnowledgeDistillation(self.step.n_old_outputs, alpha=float(hp["kd_alpha"]))
                             if self.step.is_incremental else None)
        # real frames: label 0 may be an old organ (not annotated in this step, or in DSAD's sparse labels)
        self.unbiased_segmentation = (UnbiasedDiceCELoss(self.step.n_old_outputs,
                                                         batch_dice=self.configuration_manager.batch_dice,
                                                         ignore_index=self.label_manager.ignore_label)
                                      if self.step.is_incremental else None)
        self.contrast: Optional[PixelContrastTerm] = None  # built with the optimizer, with its head and queues:
        self.projection_head = self.queue = self.synthetic_images = self.synthetic_cache_folder = None
        self.replay_models: List[Dict[str, Any]] = []
        fold = int(self.fold) if str(self.fold).isdigit() else 0
        self._synthetic_rng = np.random.default_rng([int(hp["diffusion_seed"]), fold])  # replayed images and flips

    def configure_optimizers(self):
        """nnU-Net's optimizer and schedule, plus a parameter group for the projection head (built here)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.uses_contrast:
            hp = self.hp
            with exit_on_user_error():
                channels = tap_channels(self.network, hp["contrast_tap"])
            self.contrast = PixelContrastTerm(
                channels, self.label_manager.num_segmentation_heads, int(hp["contrast_embedding_dim"]),
                int(hp["contrast_queue_size"]), float(hp["contrast_temperature"]),
                int(hp["contrast_anchors_per_class"]), int(hp["contrast_queue_pixels_per_image"])).to(self.device)
            self.projection_head, self.queue = self.contrast.head, self.contrast.queue
            optimizer.add_param_group({"params": list(self.projection_head.parameters())})
        return optimizer, lr_scheduler

    def on_incremental_train_start(self) -> None:  # the replay models of earlier steps, their samples for this step
        self.replay_models = teacher_replay_models(self)
        self.synthetic_images, self.synthetic_cache_folder = sample_replay_images(self, self.replay_models)

    def replay_batch(self, data: torch.Tensor, target: List[torch.Tensor]):
        """``synthetic_per_batch`` cached images (random flips), resized to the patch; labels all 0 (unknown)."""
        if self.synthetic_images is None:
            return None  # no replay (step 0 of the chain, or none configured)
        x = random_replay_images(self.synthetic_images, int(self.hp["synthetic_per_batch"]), data.shape[2:],
                                 self._synthetic_rng)
        return x, [t.new_zeros((x.shape[0],) + tuple(t.shape[1:])) for t in target]

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        real_output, real_target = ctx.real(output), ctx.real(target)  # replayed images have no ground truth
        loss = (self.segmentation_loss(real_output, real_target) if self.unbiased_segmentation is None
                else self.over_scales(self.unbiased_segmentation, real_output, real_target))
        terms = {"segmentation": loss}
        if self.step.is_incremental and float(self.hp["kd_weight"]) > 0 and ctx.teacher_output is not None:
            terms["kd"] = self.over_scales(self.distillation, output, ctx.teacher_output)
            loss = loss + float(self.hp["kd_weight"]) * terms["kd"]
        if self.uses_contrast:
            terms["contrast"] = self._contrast_term(output, target, ctx)
            loss = loss + float(self.hp["contrast_weight"]) * terms["contrast"]
        self.record_loss_terms(**terms)
        return loss

    def _contrast_term(self, output, target, ctx: StepContext) -> torch.Tensor:
        """Contrast of the tap's embeddings; labels: ground truth, on label 0 the teacher's confident old classes."""
        labels = target[0][:, 0].long()
        if self.label_manager.has_ignore_label:
            labels = labels.masked_fill(labels == self.label_manager.ignore_label, -1)
        if self.step.is_incremental and ctx.teacher_output is not None:
            known = torch.arange(labels.shape[0], device=labels.device) < ctx.n_real
            labels = labels_for_contrast(labels, ctx.teacher_output[0].detach(),
                                         float(self.hp["pseudo_label_confidence"]), background_known=known)
        return self.contrast(ctx.student_features["contrast"], labels, output[0])

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"synthetic_cache_folder": self.synthetic_cache_folder,
                                 "replay_models": self.replay_models,
                                 "synthetic_rng": self._synthetic_rng.bit_generator.state}
        return dict(state, **(self.contrast.checkpoint_state() if self.contrast is not None else {}))

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if self.contrast is not None:
            self.contrast.load_checkpoint_state(state)
        if state.get("synthetic_rng") is not None:
            self._synthetic_rng.bit_generator.state = state["synthetic_rng"]

    def extend_step_memory(self, memory: StepMemory) -> None:
        add_step_replay_model(self, memory)  # this step's diffusion model, trained now, listed in the memory

"""DDCL trainer: diffusion-driven distillation + cross-image pixel contrast (Zhao et al., IJCARS 2025).

"Diffusion-driven distillation and contrastive learning for class-incremental semantic segmentation of
laparoscopic images" (seeds 003/004; docs/methods_ddcl.md). A 2D method (nnU-Net ``2d`` configuration).

When a step ends (:meth:`extend_step_memory`), an unconditional DDPM (``diffusers``) is trained on the
step's preprocessed training images (patch-sized crops resized to ``diffusion_image_size``) and saved in
``<fold folder>/diffusion_model``; the step memory lists it (with the teacher's) under
``extra["ddcl_diffusion_models"]``. At a later step (:meth:`on_incremental_train_start`), ``num_synthetic``
images are sampled from every listed model with DDIM (cached in ``<fold folder>/synthetic_cache``,
resumable) and ``synthetic_per_batch`` of them, resized to the patch size and randomly flipped, are
appended to every training batch. Loss of an iteration (real samples ``R``, all samples ``A``)::

    L = DiceCE_ds(R) + kd_weight * UNKD_ds(A) + contrast_weight * InfoNCE(projection(tap features), labels)

* ``DiceCE_ds``: the segmentation loss with deep supervision, on real samples only (synthetic images have no
  ground truth): at steps > 0 MiB's unbiased Dice+CE (label 0 = background or an old organ, which a step's
  masks never label), at step 0 nnU-Net's Dice+CE;
* ``UNKD_ds``: MiB's unbiased distillation of the teacher's softmax on every sample, at every
  deep-supervision scale: on synthetic images it transfers the old classes' knowledge on old-looking
  data, the paper's "distillation driven by the diffusion model";
* ``InfoNCE``: :class:`~nnunetv2_cimis.losses.contrastive.CrossImagePixelContrastLoss` on L2-normalised
  embeddings of a projection head (kept in the trainer, not in the network: inference uses plain
  nnU-Net), with class-wise memory queues; pixel classes are the ground truth, and on pixels labelled 0
  the teacher's confident old-class predictions (on synthetic images, teacher background is ignored).
  At step 0 the contrast uses the ground truth only (no teacher, no replay).

Head, queues and the synthetic cache's location are saved in the checkpoint, so ``--c`` resumes exactly.

Hyperparameters (``nnUNet_cimis_hparams``); [known] = from the papers, otherwise a documented choice:

=================================  ==============  ================================================
name                               default         status
=================================  ==============  ================================================
kd_weight                          10.0            choice (MiB's UNKD weight)
kd_alpha                           1.0             choice (MiB's default)
contrast_weight                    0.1             choice
contrast_temperature               0.07            [known] ICCV 2021
contrast_tap                       decoder.stages.-1  choice: last decoder stage (full resolution)
contrast_embedding_dim             32              choice
contrast_anchors_per_class         64              choice
contrast_queue_size                500             choice (per class)
contrast_queue_pixels_per_image    10              choice (pixels pushed per class and image)
pseudo_label_confidence            0.5             choice: teacher softmax needed for an old-class label
synthetic_per_batch                1               choice: synthetic images appended to each batch
num_synthetic                      64              choice: images sampled (and cached) per step
diffusion_image_size               32              choice, CPU-friendly (small)
diffusion_channels                 [32, 64]        choice, CPU-friendly (small)
diffusion_train_iterations         200             choice, CPU-friendly (far too few for real data)
diffusion_batch_size               16              choice
diffusion_learning_rate            0.001           choice
diffusion_crops_per_case           8               choice: training crops taken from each case
diffusion_sampling_steps           25              choice: DDIM steps
diffusion_prediction_type          "sample"        choice: the DDPM predicts the clean image; at a few
                                                   hundred CPU iterations this gives coherent images
                                                   where noise prediction ("epsilon") gives noise
diffusion_seed                     0               choice
missing_replay_model               "error"         "error": stop when the teacher left no diffusion
                                                   model; "skip": train without replay;
                                                   "train_from_teacher_data": train one now from the
                                                   teacher's preprocessed data if still available
=================================  ==============  ================================================
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.features.taps import FeatureTaps, resolve_module
from nnunetv2_cimis.losses.common import resize_labels_nearest
from nnunetv2_cimis.losses.contrastive import (ClassMemoryQueue, CrossImagePixelContrastLoss, ProjectionHead,
                                               labels_for_contrast)
from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.synthesis.diffusion import (DiffusionConfig, SyntheticImageCache, crops_for_diffusion,
                                                replay_model_record, require_diffusers, resolve_replay_folder,
                                                save_diffusion_model, train_diffusion_model)
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental

MEMORY_KEY = "ddcl_diffusion_models"
MISSING_REPLAY_CHOICES = ("error", "skip", "train_from_teacher_data")


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                           nn.ConvTranspose3d))]
    if not convs:
        raise CIMISError(f"The contrast tap module {type(module).__name__} has no convolution; choose another "
                         f"contrast_tap (e.g. 'decoder.stages.-1')")
    return convs[-1].out_channels


def diffusion_training_images(dataset, identifiers: List[str], patch_size, config: DiffusionConfig,
                              crops_per_case: int, seed: int) -> torch.Tensor:
    """Patch-sized random crops of every preprocessed case, resized to ``config.image_size``: ``(N, C, S, S)``."""
    rng = np.random.default_rng(seed)
    crops = []
    for key in identifiers:
        data = dataset.load_case(key)[0]
        crops.append(crops_for_diffusion(np.asarray(data[:]), patch_size, config.image_size, crops_per_case, rng))
    if not crops:
        raise CIMISError("No training cases to train the diffusion model on.")
    return torch.cat(crops)


class nnUNetTrainerDDCL(nnUNetTrainerIncremental):
    """Diffusion-driven distillation + cross-image contrast (see module docstring)."""

    spatial_dims = (2,)
    needs_teacher_memory = True
    default_hyperparameters: Dict[str, Any] = {
        "kd_weight": 10.0, "kd_alpha": 1.0,
        "contrast_weight": 0.1, "contrast_temperature": 0.07, "contrast_tap": "decoder.stages.-1",
        "contrast_embedding_dim": 32, "contrast_anchors_per_class": 64, "contrast_queue_size": 500,
        "contrast_queue_pixels_per_image": 10, "pseudo_label_confidence": 0.5,
        "synthetic_per_batch": 1, "num_synthetic": 64,
        "diffusion_image_size": 32, "diffusion_channels": [32, 64], "diffusion_train_iterations": 200,
        "diffusion_batch_size": 16, "diffusion_learning_rate": 1e-3, "diffusion_crops_per_case": 8,
        "diffusion_sampling_steps": 25, "diffusion_prediction_type": "sample", "diffusion_seed": 0,
        "missing_replay_model": "error",
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error():
            if len(self.configuration_manager.patch_size) != 2:
                raise CIMISError(f"nnUNetTrainerDDCL is a 2D method (its replay model generates 2D images); train it "
                                 f"with the 2d configuration, not '{configuration}' (patch size "
                                 f"{list(self.configuration_manager.patch_size)})")
            if self.hp["missing_replay_model"] not in MISSING_REPLAY_CHOICES:
                raise CIMISError(f"missing_replay_model must be one of {MISSING_REPLAY_CHOICES}, got "
                                 f"{self.hp['missing_replay_model']!r}")
            for k in ("kd_weight", "contrast_weight"):
                if float(self.hp[k]) < 0:
                    raise CIMISError(f"hyperparameter {k} must be >= 0, got {self.hp[k]}")
            for k in ("synthetic_per_batch", "num_synthetic"):
                if int(self.hp[k]) < 0:
                    raise CIMISError(f"hyperparameter {k} must be >= 0, got {self.hp[k]}")
            self.diffusion_config = self._diffusion_config()
            self.contrast = CrossImagePixelContrastLoss(
                temperature=float(self.hp["contrast_temperature"]),
                max_anchors_per_class=int(self.hp["contrast_anchors_per_class"]),
                queue_pixels_per_image=int(self.hp["contrast_queue_pixels_per_image"]))
        self.distillation = (UnbiasedKnowledgeDistillation(self.step.n_old_outputs, alpha=float(self.hp["kd_alpha"]))
                             if self.step.is_incremental else None)
        # real frames: label 0 may be an old organ (not annotated in this step, or in DSAD's sparse labels)
        self.unbiased_segmentation = (UnbiasedDiceCELoss(self.step.n_old_outputs,
                                                         batch_dice=self.configuration_manager.batch_dice,
                                                         ignore_index=self.label_manager.ignore_label)
                                      if self.step.is_incremental else None)
        self.projection_head: Optional[ProjectionHead] = None
        self.queue: Optional[ClassMemoryQueue] = None
        self._contrast_taps: Optional[FeatureTaps] = None
        self.synthetic_images: Optional[torch.Tensor] = None
        self.synthetic_cache_folder: Optional[str] = None
        self.replay_models: List[Dict[str, Any]] = []
        self._n_real = 0
        self._synthetic_rng = np.random.default_rng([int(self.hp["diffusion_seed"]), int(fold) if str(fold).isdigit() else 0])

    def _diffusion_config(self) -> DiffusionConfig:
        try:
            return DiffusionConfig(image_size=int(self.hp["diffusion_image_size"]),
                                   block_channels=tuple(int(c) for c in self.hp["diffusion_channels"]),
                                   train_iterations=int(self.hp["diffusion_train_iterations"]),
                                   batch_size=int(self.hp["diffusion_batch_size"]),
                                   learning_rate=float(self.hp["diffusion_learning_rate"]),
                                   sampling_steps=int(self.hp["diffusion_sampling_steps"]),
                                   prediction_type=str(self.hp["diffusion_prediction_type"]),
                                   seed=int(self.hp["diffusion_seed"]))
        except (ValueError, TypeError) as e:
            raise CIMISError(f"bad diffusion hyperparameters: {e}") from None

    @property
    def uses_contrast(self) -> bool:
        return float(self.hp["contrast_weight"]) > 0

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        """nnU-Net's optimizer and schedule, plus a parameter group for the projection head (built here)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.uses_contrast:
            with exit_on_user_error():
                tap_module = resolve_module(self.network, self.hp["contrast_tap"])
                channels = _last_conv_channels(tap_module)
            self.projection_head = ProjectionHead(channels, int(self.hp["contrast_embedding_dim"]),
                                                  spatial_dims=2).to(self.device)
            self.queue = ClassMemoryQueue(self.label_manager.num_segmentation_heads,
                                          int(self.hp["contrast_embedding_dim"]),
                                          int(self.hp["contrast_queue_size"])).to(self.device)
            optimizer.add_param_group({"params": list(self.projection_head.parameters())})
        return optimizer, lr_scheduler

    def initialize(self):
        with exit_on_user_error():
            require_diffusers()  # fail before training, not when the step's diffusion model is trained at its end
        super().initialize()
        if self.uses_contrast:
            with exit_on_user_error():
                self._contrast_taps = FeatureTaps(self.network, {"contrast": self.hp["contrast_tap"]})

    def on_incremental_train_start(self) -> None:
        """Find the replay models left by earlier steps, sample (or reuse) the synthetic images."""
        entries = list((self.teacher_memory.extra if self.teacher_memory is not None else {}).get(MEMORY_KEY, []))
        if not entries:
            choice = self.hp["missing_replay_model"]
            if choice == "error":
                raise CIMISError(
                    f"The teacher ({self.teacher_info.checkpoint_path}) left no diffusion model in its step memory: "
                    f"it was not trained with nnUNetTrainerDDCL. Train every step of the chain with nnUNetTrainerDDCL "
                    f"(step 0 included), or set the hyperparameter missing_replay_model to 'skip' (no replay) or "
                    f"'train_from_teacher_data' (train one now from the teacher's preprocessed data), e.g. "
                    f"nnUNet_cimis_hparams='{{\"missing_replay_model\": \"skip\"}}'.")
            if choice == "train_from_teacher_data":
                entries = [self._train_replay_model_for_teacher()]
        self.replay_models = entries
        if not entries or int(self.hp["num_synthetic"]) == 0 or int(self.hp["synthetic_per_batch"]) == 0:
            self.print_to_log_file("DDCL: no replay (no diffusion model or num_synthetic / synthetic_per_batch = 0)")
            self.synthetic_images = None
            return
        folders = [resolve_replay_folder(e) for e in entries]
        self.synthetic_cache_folder = os.path.join(self.output_folder, "synthetic_cache")
        cache = SyntheticImageCache(self.synthetic_cache_folder, folders, int(self.hp["num_synthetic"]),
                                    int(self.hp["diffusion_sampling_steps"]), int(self.hp["diffusion_seed"]))
        stats = cache.ensure(self.device, log=self.print_to_log_file)
        self.synthetic_images = cache.load()
        self.print_to_log_file(f"DDCL: {self.synthetic_images.shape[0]} synthetic images from {len(folders)} diffusion "
                               f"model(s) in {self.synthetic_cache_folder}; sampled now: {stats['sampled']} "
                               f"({stats['seconds_per_image']:.3f} s per image)")

    def _train_replay_model_for_teacher(self) -> Dict[str, Any]:
        """Fallback: train the teacher step's diffusion model from its preprocessed data (if still on disk)."""
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        teacher_dataset = self.step.teacher.dataset
        base = os.path.join(nnUNet_preprocessed.get() if nnUNet_preprocessed.is_set() else "", teacher_dataset)
        folder = os.path.join(base, self.configuration_manager.data_identifier)
        if not os.path.isdir(folder):
            raise CIMISError(f"missing_replay_model='train_from_teacher_data' needs the teacher's preprocessed data "
                             f"{folder}, which is not available; use 'skip' or retrain the teacher with "
                             f"nnUNetTrainerDDCL.")
        dataset_class = infer_dataset_class(folder)
        keys = dataset_class.get_identifiers(folder)
        out = os.path.join(self.output_folder, f"diffusion_model_step{self.step.index - 1}")
        self.print_to_log_file(f"DDCL: training the teacher step's diffusion model from {folder}")
        self._train_and_save_replay_model(dataset_class(folder, keys), keys, out, self.step.index - 1, teacher_dataset)
        return replay_model_record(out, self.step.index - 1)

    def _train_and_save_replay_model(self, dataset, keys, out_folder, step, dataset_name) -> str:
        images = diffusion_training_images(dataset, keys, self.configuration_manager.patch_size,
                                           self.diffusion_config, int(self.hp["diffusion_crops_per_case"]),
                                           int(self.hp["diffusion_seed"]))
        model = train_diffusion_model(images, self.diffusion_config, self.device, log=self.print_to_log_file)
        save_diffusion_model(model, out_folder, extra_meta={"step": int(step), "dataset": dataset_name,
                                                            "cases": len(keys),
                                                            "patch_size": list(self.configuration_manager.patch_size)})
        self.print_to_log_file(f"DDCL: diffusion model of step {step} saved to {out_folder} "
                               f"({model.meta['train_seconds']:.1f} s, {images.shape[0]} crops, "
                               f"final loss {model.meta['final_loss']:.4f})")
        return out_folder

    # ------------------------------------------------------------------ training
    def _synthetic_batch(self, n: int, spatial) -> torch.Tensor:
        idx = self._synthetic_rng.integers(0, self.synthetic_images.shape[0], n)
        x = self.synthetic_images[torch.as_tensor(idx)]
        x = F.interpolate(x, size=tuple(spatial), mode="bilinear", align_corners=False)
        for i in range(n):
            for axis in (-1, -2):
                if self._synthetic_rng.random() < 0.5:
                    x[i] = x[i].flip(axis)
        return x

    def train_step(self, batch: dict) -> dict:
        data, target = batch["data"], batch["target"]
        self._n_real = data.shape[0]
        if self.step.is_incremental and self.synthetic_images is not None:
            k = int(self.hp["synthetic_per_batch"])
            syn = self._synthetic_batch(k, data.shape[2:]).to(data.dtype)
            if syn.shape[1] != data.shape[1]:
                raise CIMISError(f"The replay images have {syn.shape[1]} channels but the data has {data.shape[1]}; "
                                 f"the diffusion model belongs to another dataset.")
            data = torch.cat([data, syn.to(data.device)])
            targets = target if isinstance(target, list) else [target]
            targets = [torch.cat([t, t.new_zeros((k,) + tuple(t.shape[1:]))]) for t in targets]
            batch = dict(batch, data=data, target=targets if isinstance(target, list) else targets[0])
        own_ctx = not self.step.is_incremental and self.uses_contrast
        if own_ctx:  # step 0: route the loss through compute_loss for the contrast term
            self._ctx = StepContext(data=data)
        try:
            return super().train_step(batch)
        finally:
            if own_ctx:
                self._ctx = None
            if self._contrast_taps is not None:
                self._contrast_taps.clear()

    def validation_step(self, batch: dict) -> dict:
        try:
            return super().validation_step(batch)
        finally:
            if self._contrast_taps is not None:
                self._contrast_taps.clear()

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        n = self._n_real
        real_output, real_target = [o[:n] for o in output], [t[:n] for t in target]
        loss = (self.segmentation_loss(real_output, real_target) if self.unbiased_segmentation is None else
                apply_over_scales(self.unbiased_segmentation, deep_supervision_weights(len(output)), real_output,
                                  real_target))
        if self.step.is_incremental and float(self.hp["kd_weight"]) > 0 and ctx.teacher_output is not None:
            weights = deep_supervision_weights(len(output))
            kd = apply_over_scales(self.distillation, weights, output, ctx.teacher_output)
            loss = loss + float(self.hp["kd_weight"]) * kd
        if self.uses_contrast:
            loss = loss + float(self.hp["contrast_weight"]) * self._contrast_term(output, target, ctx)
        return loss

    def _contrast_term(self, output, target, ctx: StepContext) -> torch.Tensor:
        features = self._contrast_taps.features.get("contrast")
        if features is None:
            raise CIMISError(f"the contrast tap {self.hp['contrast_tap']} captured nothing in this forward pass")
        embeddings = self.projection_head(features.float())
        labels = target[0][:, 0].long()
        if self.label_manager.has_ignore_label:
            labels = labels.masked_fill(labels == self.label_manager.ignore_label, -1)
        if self.step.is_incremental and ctx.teacher_output is not None:
            known = torch.arange(labels.shape[0], device=labels.device) < self._n_real
            labels = labels_for_contrast(labels, ctx.teacher_output[0].detach(),
                                         float(self.hp["pseudo_label_confidence"]), background_known=known)
        predictions = output[0].detach().argmax(1)
        size = embeddings.shape[2:]
        labels = resize_labels_nearest(labels, size)
        predictions = resize_labels_nearest(predictions, size)
        value = self.contrast(embeddings, labels, queue=self.queue, predictions=predictions)
        self.contrast.update_queue(self.queue, embeddings, labels)
        return value

    # ------------------------------------------------------------------ state and step memory
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"synthetic_cache_folder": self.synthetic_cache_folder,
                                 "replay_models": self.replay_models,
                                 "synthetic_rng": self._synthetic_rng.bit_generator.state}
        if self.projection_head is not None:
            state["projection_head"] = {k: v.detach().cpu() for k, v in self.projection_head.state_dict().items()}
            state["queue"] = {k: v.detach().cpu() for k, v in self.queue.state_dict().items()}
        return state

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if self.projection_head is not None:
            if "projection_head" not in state:
                raise CIMISError("This checkpoint has no DDCL projection head: it was written with contrast_weight = 0 "
                                 "or by another trainer; resume with the same hyperparameters.")
            self.projection_head.load_state_dict(state["projection_head"])
            self.queue.load_state_dict(state["queue"])
        if state.get("synthetic_rng") is not None:
            self._synthetic_rng.bit_generator.state = state["synthetic_rng"]

    def extend_step_memory(self, memory: StepMemory) -> None:
        """Train this step's diffusion model on its training cases, save it, list it in the step memory."""
        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        out = os.path.join(self.output_folder, "diffusion_model")
        self._train_and_save_replay_model(dataset, tr_keys, out, self.step.index, self.plans_manager.dataset_name)
        entries = [e for e in self.replay_models if e.get("step") != self.step.index]
        memory.extra[MEMORY_KEY] = entries + [replay_model_record(out, self.step.index)]

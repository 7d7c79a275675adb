"""MOSInversion trainer: replay of synthetic old-class volumes made by mask-conditioned DeepInversion.

Kim et al., Comput. Biol. Med. 2025 (seed 002). At the start of a step t > 0 the trainer obtains a set of
synthetic volumes from the teacher (:mod:`nnunetv2_cimis.synthesis.inversion`: Gaussian start, Adam on the
image only, Dice against an augmented label patch of the earlier step + feature-statistics matching against
the teacher's step memory + TV priors; the teacher's argmax is the label). Every training batch of ``B`` real
patches is then extended by ``k = max(1, round(synthetic_ratio * B))`` synthetic ones (random flips), and

    L = L_real(z[:B], y[:B]) + synthetic_seg_weight * DiceCE(z[B:], y_teacher[B:])
        + kd_weight * sum_s w_s LwF-KD(z_s[B:], z_s^teacher[B:])

``L_real`` is MiB's unbiased Dice+CE (``real_loss = "unbiased"``: label 0 of the real data may be an old
class) or nnU-Net's plain Dice+CE (``"dice_ce"``). The KD is the soft cross-entropy over the teacher's
channels (:class:`~nnunetv2_cimis.losses.lwf.LwFDistillationLoss`) at every deep-supervision scale with
nnU-Net's weights ``w_s``; the synthetic labels are downsampled to each scale by nearest neighbour
(``nearest-exact``, as nnU-Net's ``DownsampleSegForDSTransform``).

Where the synthetic set comes from (first match wins):

1. ``synthetic_folder`` (hyperparameter) if not empty: a set made by ``nnUNetv2_cimis_synthesize`` from the
   same teacher checkpoint (its SHA-256 is checked); used as it is.
2. ``<teacher fold folder>/mosinv_synthetic`` (the CLI's default output) if it was made from this teacher and
   holds at least ``num_synthetic`` volumes.
3. ``<student fold folder>/mosinv_synthetic``: generated (or completed, resumably) with the hyperparameters
   below. ``--c`` finds it again.

At the end of the step the conditioning masks of the teacher are carried into this step's memory
(``extra["inversion_label_bank"]``) so that the next step can still synthesise the classes of every earlier
step.

Hyperparameters (``nnUNet_cimis_hparams``); "[known]" from the paper / first author's code, "choice" = [open]:

=========================  ==========  ===========================================================================
name                       default     status
=========================  ==========  ===========================================================================
num_synthetic              32          choice: number of synthetic volumes per step
inversion_iterations       2000        [known] (use ~20 for tests / demo)
inversion_lr               0.1         [known] Adam learning rate
inversion_lr_schedule      "poly"      [known] first author's code (poly, power 0.9); "constant" switches it off
inversion_batch_size       2           choice (first author's code: 2): volumes optimised together
dice_weight                1.0         [known] Dice term of the inversion
stats_weight               1.0         [known] feature-statistics term of the inversion
first_layer_weight         10.0        [known] first normalisation layer x10
tv_l1_weight               2.5e-5      [known]
tv_l2_weight               3e-8        [known]
mask_augmentation          true        [known] flips + elastic + affine on the conditioning masks (values choice)
synthesis_seed             0           choice
synthetic_folder           ""          a set made beforehand with nnUNetv2_cimis_synthesize
synthetic_ratio            0.5         choice: synthetic volumes per real volume in a batch (0 = no replay)
kd_weight                  10.0        choice: weight of the KD on synthetic volumes
synthetic_seg_weight       1.0         choice: Dice+CE of the student against the teacher's labels
real_loss                  "unbiased"  choice: "unbiased" (MiB) or "dice_ce" (nnU-Net) on the real data
carried_masks_max          64          choice: conditioning masks carried to the next step's memory
=========================  ==========  ===========================================================================
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.losses.common import resize_labels_like
from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights
from nnunetv2_cimis.losses.lwf import LwFDistillationLoss
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.synthesis.inversion import InversionConfig
from nnunetv2_cimis.synthesis.mask_augmentation import MaskAugmentation, conditioning_masks
from nnunetv2_cimis.synthesis.synthetic_sets import (DEFAULT_SUBFOLDER, existing_volumes, file_fingerprint,
                                                     load_synthetic_set, synthesis_settings,
                                                     synthesize_from_teacher, usable_set)
from nnunetv2_cimis.training.incremental_trainer import StepContext, nnUNetTrainerIncremental


#: the resize of the synthetic labels to each deep-supervision scale (the package's one label resize)
downsample_labels_like = resize_labels_like


class nnUNetTrainerMOSInv(nnUNetTrainerIncremental):
    """MOSInversion: synthetic old-class replay with teacher distillation (see module docstring)."""

    needs_teacher_memory = True
    default_hyperparameters: Dict[str, Any] = {
        "num_synthetic": 32, "inversion_iterations": 2000, "inversion_lr": 0.1, "inversion_lr_schedule": "poly",
        "inversion_batch_size": 2, "dice_weight": 1.0, "stats_weight": 1.0, "first_layer_weight": 10.0,
        "tv_l1_weight": 2.5e-5, "tv_l2_weight": 3e-8, "mask_augmentation": True, "synthesis_seed": 0,
        "synthetic_folder": "", "synthetic_ratio": 0.5, "kd_weight": 10.0, "synthetic_seg_weight": 1.0,
        "real_loss": "unbiased", "carried_masks_max": 64,
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synthetic_folder: Optional[str] = None
        self.synthetic_images: Optional[torch.Tensor] = None  # (N, C_in, *patch) float32, CPU
        self.synthetic_labels: Optional[torch.Tensor] = None  # (N, 1, *patch) uint8, CPU
        self._n_synthetic_in_batch = 0
        self.distillation = LwFDistillationLoss(alpha=1.0)
        self.unbiased_segmentation = None
        if self.step.is_incremental:
            with exit_on_user_error():
                self._check_hyperparameters()
            if self.hp["real_loss"] == "unbiased":
                self.unbiased_segmentation = UnbiasedDiceCELoss(
                    self.step.n_old_outputs, batch_dice=self.configuration_manager.batch_dice,
                    ignore_index=self.label_manager.ignore_label)

    def _check_hyperparameters(self) -> None:
        hp = self.hp
        if hp["real_loss"] not in ("unbiased", "dice_ce"):
            raise CIMISError(f"hyperparameter real_loss must be 'unbiased' or 'dice_ce', got {hp['real_loss']!r}")
        for name in ("num_synthetic", "inversion_batch_size"):
            if int(hp[name]) < 1:
                raise CIMISError(f"hyperparameter {name} must be >= 1, got {hp[name]}")
        for name in ("synthetic_ratio", "kd_weight", "synthetic_seg_weight", "carried_masks_max"):
            if hp[name] < 0:
                raise CIMISError(f"hyperparameter {name} must be >= 0, got {hp[name]}")
        self.inversion_config()

    # ------------------------------------------------------------------ synthesis
    def inversion_config(self) -> InversionConfig:
        hp = self.hp
        try:
            return InversionConfig(iterations=int(hp["inversion_iterations"]), lr=hp["inversion_lr"],
                                   lr_schedule=hp["inversion_lr_schedule"], dice_weight=hp["dice_weight"],
                                   stats_weight=hp["stats_weight"], first_layer_weight=hp["first_layer_weight"],
                                   tv_l1_weight=hp["tv_l1_weight"], tv_l2_weight=hp["tv_l2_weight"])
        except ValueError as e:
            raise CIMISError(f"MOSInversion hyperparameters: {e}") from None

    def _find_or_make_synthetic_set(self) -> str:
        ckpt = self.teacher_info.checkpoint_path
        fingerprint = file_fingerprint(ckpt)
        n = int(self.hp["num_synthetic"])
        explicit = str(self.hp["synthetic_folder"]).strip()
        if explicit:
            if not usable_set(explicit, fingerprint, 1):  # a set chosen by the user: its settings are its own
                raise CIMISError(f"synthetic_folder={explicit} holds no synthetic set of the teacher {ckpt}. "
                                 f"Make one with `nnUNetv2_cimis_synthesize -m {self.teacher_info.model_folder} "
                                 f"-f {self.fold} -o {explicit}` or leave synthetic_folder empty.")
            return explicit
        own = os.path.join(self.output_folder, DEFAULT_SUBFOLDER)
        candidates = [os.path.join(os.path.dirname(ckpt), DEFAULT_SUBFOLDER), own]
        if self.synthetic_folder:  # from the checkpoint (--c)
            candidates.insert(0, self.synthetic_folder)
        aug = MaskAugmentation() if self.hp["mask_augmentation"] else \
            MaskAugmentation(p_flip=0, p_elastic=0, p_rotation=0, p_scale=0)
        settings = synthesis_settings(self.inversion_config(), aug, int(self.hp["synthesis_seed"]),
                                      int(self.hp["inversion_batch_size"]))
        for folder in candidates:  # reused only when made from this teacher with these settings
            if usable_set(folder, fingerprint, n, settings):
                self.print_to_log_file(f"MOSInversion: reusing the synthetic set {folder}")
                return folder
        self.print_to_log_file(f"MOSInversion: synthesising {n} volumes into {own}")
        synthesize_from_teacher(ckpt, self.teacher, self.teacher_memory, self.num_input_channels, own, n,
                                self.inversion_config(), batch_size=int(self.hp["inversion_batch_size"]),
                                seed=int(self.hp["synthesis_seed"]), augmentation=aug, device=self.device,
                                show_progress=self.local_rank == 0, log=self.print_to_log_file)
        return own

    def on_incremental_train_start(self) -> None:
        memory = self.teacher_memory
        if memory is None:
            raise CIMISError("MOSInversion needs the teacher's step memory, but none was loaded.")
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if memory.patch_size and list(memory.patch_size) != patch:
            raise CIMISError(f"The teacher's step memory has patch size {memory.patch_size} but this step trains "
                             f"with {patch}: use the plans of the first step for every step.")
        if self._synthetic_per_batch(self.batch_size) == 0:
            self.print_to_log_file("MOSInversion: synthetic_ratio is 0, no synthesis and no replay")
            return
        if self.is_ddp and self.local_rank != 0:
            torch.distributed.barrier()  # rank 0 synthesises; the others then find its set and reuse it
        folder = self._find_or_make_synthetic_set()
        if self.is_ddp and self.local_rank == 0:
            torch.distributed.barrier()
        indices = existing_volumes(folder)[: int(self.hp["num_synthetic"])]
        images, labels = load_synthetic_set(folder, indices)
        if list(images.shape[2:]) != patch or images.shape[1] != self.num_input_channels:
            raise CIMISError(f"The synthetic volumes in {folder} have shape {images.shape[1:]}, but training "
                             f"needs ({self.num_input_channels}, {patch}).")
        self.synthetic_folder = folder
        self.synthetic_images = torch.from_numpy(images)
        self.synthetic_labels = torch.from_numpy(labels)[:, None]
        counts = {int(v): int(c) for v, c in zip(*np.unique(labels, return_counts=True))}
        self.print_to_log_file(f"MOSInversion: {len(indices)} synthetic volumes from {folder}; label voxel counts "
                               f"{counts}; {self._synthetic_per_batch(self.batch_size)} per batch of "
                               f"{self.batch_size} real")

    def _synthetic_per_batch(self, real_batch: int) -> int:
        ratio = float(self.hp["synthetic_ratio"])
        return 0 if ratio <= 0 else max(1, int(round(ratio * real_batch)))

    def synthetic_batch(self, k: int, targets: List[torch.Tensor]):
        """``k`` random synthetic volumes (random flips) and their labels at the scales of ``targets``."""
        idx = torch.randint(len(self.synthetic_images), (k,))
        x = self.synthetic_images[idx].clone()
        y = self.synthetic_labels[idx].clone()
        for b in range(k):  # x[b]: (C, *spatial)
            dims = [1 + a for a in range(x.ndim - 2) if torch.rand(()) < 0.5]
            if dims:
                x[b] = x[b].flip(dims)
                y[b] = y[b].flip(dims)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return x, [downsample_labels_like(y, t) for t in targets]

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        self._n_synthetic_in_batch = 0
        if not self.step.is_incremental or self.synthetic_images is None:
            return super().train_step(batch)
        data = batch["data"]
        k = self._synthetic_per_batch(data.shape[0])
        if k == 0:
            return super().train_step(batch)
        target = batch["target"]
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        targets = [t.to(self.device, non_blocking=True) for t in targets]
        x_syn, y_syn = self.synthetic_batch(k, targets)
        data = torch.cat([data.to(self.device, non_blocking=True), x_syn.to(data.dtype)])
        merged = [torch.cat([t, s]) for t, s in zip(targets, y_syn)]
        self._n_synthetic_in_batch = k
        try:
            return super().train_step(dict(batch, data=data,
                                           target=merged if isinstance(target, (list, tuple)) else merged[0]))
        finally:
            self._n_synthetic_in_batch = 0

    def real_loss(self, output: List[torch.Tensor], target: List[torch.Tensor]) -> torch.Tensor:
        if self.unbiased_segmentation is None:
            return self.segmentation_loss(output, target)
        return apply_over_scales(self.unbiased_segmentation, deep_supervision_weights(len(output)), output, target)

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        k = self._n_synthetic_in_batch
        b = output[0].shape[0] - k
        loss = self.real_loss([o[:b] for o in output], [t[:b] for t in target])
        if k == 0:
            return loss
        syn_out = [o[b:] for o in output]
        if self.hp["synthetic_seg_weight"] > 0:
            loss = loss + self.hp["synthetic_seg_weight"] * self.segmentation_loss(syn_out, [t[b:] for t in target])
        if self.hp["kd_weight"] > 0:
            if ctx.teacher_output is None or len(ctx.teacher_output) != len(output):
                raise CIMISError("MOSInversion needs the teacher's output at every deep-supervision scale")
            kd = apply_over_scales(self.distillation, deep_supervision_weights(len(output)), syn_out,
                                   [t[b:] for t in ctx.teacher_output])
            loss = loss + self.hp["kd_weight"] * kd
        return loss

    # ------------------------------------------------------------------ state and memory
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"synthetic_folder": self.synthetic_folder}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        folder = state.get("synthetic_folder")
        self.synthetic_folder = folder if folder and os.path.isdir(folder) else None

    def extend_step_memory(self, memory: StepMemory) -> None:
        """Carry the teacher's conditioning masks forward, so later steps can synthesise every old class."""
        if self.teacher_memory is None:
            return
        carried = conditioning_masks(self.teacher_memory)[: int(self.hp["carried_masks_max"])]
        memory.extra["inversion_label_bank"] = [np.asarray(m, dtype=np.uint8) for m in carried]

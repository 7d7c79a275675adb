"""The one base of every class-incremental trainer: ``nnUNetTrainerIncremental``.

Shared incremental machinery lives here once:

* step metadata (``self.step``), method hyperparameters (``self.hp``), training length from the environment;
* the method's losses, built once by :meth:`~nnUNetTrainerIncremental.build_method_losses` (a ``ValueError`` or
  ``TypeError`` there becomes the user-facing error naming ``nnUNet_cimis_hparams``);
* the teacher: found from the step metadata, built by its own trainer class, frozen; the student starts from
  it with every deep-supervision head widened (``nnunetv2_cimis.teacher.head``);
* feature taps on student and teacher (``student_feature_taps`` / ``teacher_feature_taps``);
* replay: the samples :meth:`~nnUNetTrainerIncremental.replay_batch` returns are appended to every training
  batch, and their number is recorded in the step context;
* the teacher forward pass in every training iteration, handed to :meth:`compute_loss` through ``ctx``;
* nnU-Net's deep-supervision weights, read from its own ``DeepSupervisionWrapper``
  (``self.deep_supervision_weights``, :meth:`~nnUNetTrainerIncremental.over_scales`);
* the mean of every loss term a method records (:meth:`record_loss_terms`) in the training log, each epoch;
* method state in the checkpoint (``extra_checkpoint_state``), so ``--c`` resumes exactly;
* the step memory written next to ``checkpoint_final.pth`` when the step ends.

At step 0 (no teacher) the trainer behaves like ``nnUNetTrainer`` and still writes the step memory: taps,
replay and :meth:`compute_loss` are inactive unless the method sets ``method_loss_at_step0``.
Subclasses override only what their method changes; see ``docs/architecture.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import autocast, nn

from nnunetv2.paths import nnUNet_results
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_cimis.errors import CIMISError, exit_on_user_error
from nnunetv2_cimis.networks.taps import FeatureTaps
from nnunetv2_cimis.losses.common import check_batch_labels
from nnunetv2_cimis.losses.deep_supervision import apply_over_scales
from nnunetv2_cimis.memory.compute import DEFAULT_PROTOTYPE_TAP, compute_step_memory
from nnunetv2_cimis.memory.step_memory import STEP_MEMORY_FILENAME, StepMemory, carry_forward
from nnunetv2_cimis.memory.teacher_memory import ensure_step_memory
from nnunetv2_cimis.networks.unwrap import unwrap_network
from nnunetv2_cimis.safe_load import load_weights_only, torch_load_weights_only
from nnunetv2_cimis.scenarios.step_metadata import StepInfo, read_step_info
from nnunetv2_cimis.settings import (ENV_FINAL_VALIDATION, apply_cpu_threads, apply_training_length,
                                     final_validation_enabled, incremental_lr, move_to_variant_folder,
                                     nnunet_fold_folders, resolve_hyperparameters, results_trainer_name)
from nnunetv2_cimis.teacher.head import HEAD_INITS, widen_student_from_teacher
from nnunetv2_cimis.teacher.loading import LoadedTeacher, load_teacher, teacher_checkpoint_path

CHECKPOINT_KEY = "cimis_state"


class HyperparameterError(CIMISError, ValueError):
    """A bad method hyperparameter (a ``ValueError`` or ``TypeError`` raised while the method's losses are built)."""


@dataclass
class StepContext:
    """What one training iteration hands to :meth:`nnUNetTrainerIncremental.compute_loss`.

    Attributes:
        data: the input batch ``(B, C_in, ...)`` on the training device: the ``n_real`` samples of nnU-Net's
            data loader first, then the ``n_replayed`` samples of :meth:`nnUNetTrainerIncremental.replay_batch`.
        teacher_output: the teacher's logits on ``data``, a list over deep-supervision scales (highest
            resolution first; one entry without deep supervision), or None when the teacher is not run
            (step 0, or ``uses_teacher_outputs = False``).
        teacher_features: tap name -> teacher feature (detached).
        student_features: tap name -> student feature (with gradients).
        n_replayed: number of replayed samples at the end of the batch (0 without replay).
    """

    data: torch.Tensor
    teacher_output: Optional[List[torch.Tensor]] = None
    teacher_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    n_replayed: int = 0

    @property
    def n_real(self) -> int:
        """Number of real samples (from nnU-Net's data loader) at the start of the batch."""
        return self.data.shape[0] - self.n_replayed

    def real(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The real samples of every tensor of a list over scales (``t[:n_real]``)."""
        return [t[:self.n_real] for t in tensors]

    def replayed(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The replayed samples of every tensor of a list over scales (``t[n_real:]``)."""
        return [t[self.n_real:] for t in tensors]


class _RoutedLoss(nn.Module):
    """``self.loss`` of an incremental trainer: nnU-Net's ``train_step`` calls it as ``loss(output, target)``;
    it routes training iterations to the trainer's ``compute_loss`` and everything else (validation) to
    ``segmentation_loss``."""

    def __init__(self, trainer: "nnUNetTrainerIncremental"):
        super().__init__()
        self.__dict__["_trainer"] = trainer  # not a submodule, no reference cycle through _modules

    def forward(self, output, target):
        trainer = self._trainer
        output = output if isinstance(output, (list, tuple)) else [output]
        target = target if isinstance(target, (list, tuple)) else [target]
        ctx = trainer._ctx
        if ctx is None:
            return trainer.segmentation_loss(output, target)
        if trainer._student_taps is not None:
            ctx.student_features = dict(trainer._student_taps.features)
        return trainer.compute_loss(list(output), list(target), ctx)


class nnUNetTrainerIncremental(nnUNetTrainer):
    """Base trainer of class-incremental steps (see module docstring). Used as is, it is fine-tuning."""

    #: spatial dimensions the method supports (2D and/or 3D configurations)
    spatial_dims: tuple = (2, 3)
    #: name of the method in log lines (default: the class name without ``nnUNetTrainer``)
    method_name: str = ""
    #: run the teacher on every training batch (steps > 0)
    uses_teacher_outputs: bool = True
    #: also route step-0 training iterations through :meth:`compute_loss` (``ctx`` without teacher and replay)
    #: and install the student feature taps at step 0; off: step 0 is nnU-Net's own Dice+CE
    method_loss_at_step0: bool = False
    #: load the teacher's step memory into ``self.teacher_memory``
    needs_teacher_memory: bool = False
    #: tap name -> module path, captured on the student / the teacher at every training forward pass
    student_feature_taps: Dict[str, str] = {}
    teacher_feature_taps: Dict[str, str] = {}
    #: the method's named hyperparameters; overridden by ``nnUNet_cimis_hparams``
    default_hyperparameters: Dict[str, Any] = {}
    #: initial learning rate of steps > 0 (nnU-Net's 1e-2 for step 0); ``nnUNet_cimis_lr`` overrides it.
    #: 10x lower than step 0, the usual practice of MiB / PLOP, so the widened student drifts slowly.
    incremental_initial_lr: float = 1e-3
    #: initialisation of the new rows of the widened head: "mib" (MiB's: new classes share the background's
    #: probability) or "random" (nnU-Net's fresh initialisation, as MiB's code does for FT, LwF and ILT)
    head_init: str = "mib"
    #: module path of the features whose class means are saved as prototypes in the step memory
    memory_prototype_tap: str = DEFAULT_PROTOTYPE_TAP
    #: number of label patches kept in the step memory for mask-conditioned synthesis
    memory_label_bank_size: int = 32
    #: stop training after this many consecutive iterations with a non-finite loss
    max_nonfinite_iterations: int = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        fresh = [f for f in nnunet_fold_folders(type(self).__name__, plans, configuration, fold) if not os.path.isdir(f)]
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error():
            self.step: StepInfo = read_step_info(dataset_json, self.plans_manager.dataset_name)
            self.hp: Dict[str, Any] = resolve_hyperparameters(self.default_hyperparameters, self.__class__.__name__)
            apply_training_length(self)
            apply_cpu_threads(self.device)
            if self.step.is_incremental:
                self.initial_lr = incremental_lr(self.incremental_initial_lr)
            # nnUNet_cimis_variant_folders=1: results in <trainer>_<non-default settings>__<plans>__<configuration>
            self.results_trainer_name = results_trainer_name(type(self).__name__, self.default_hyperparameters,
                                                             self.incremental_initial_lr, self.step.is_incremental,
                                                             self.hp)
            move_to_variant_folder(self, self.results_trainer_name, fresh)
        self.teacher: Optional[nn.Module] = None
        self.teacher_info: Optional[LoadedTeacher] = None
        self.teacher_memory: Optional[StepMemory] = None
        self._carried_memory: Optional[StepMemory] = None  # the teacher's memory when the method does not need it
        self._ctx: Optional[StepContext] = None
        self._student_taps: Optional[FeatureTaps] = None
        self._teacher_taps: Optional[FeatureTaps] = None
        self._term_sums: Dict[str, torch.Tensor] = {}  # loss term -> sum over this epoch's iterations
        self._term_counts: Dict[str, int] = {}
        self.deep_supervision_weights: List[float] = [1.0]  # nnU-Net's, set in _build_loss
        with exit_on_user_error():
            if len(self.configuration_manager.patch_size) not in self.spatial_dims:
                raise CIMISError(f"{type(self).__name__} supports {' and '.join(f'{d}D' for d in self.spatial_dims)} "
                                 f"configurations only; train it with one of those, not '{configuration}' (patch "
                                 f"size {list(self.configuration_manager.patch_size)})")
            self._build_method_losses()

    def _build_method_losses(self) -> None:
        """Call :meth:`build_method_losses`; a ``ValueError`` / ``TypeError`` becomes a :class:`HyperparameterError`."""
        try:
            self.build_method_losses()
        except (ValueError, TypeError) as e:
            raise HyperparameterError(f"{self.__class__.__name__}: {e}; check nnUNet_cimis_hparams") from None

    @property
    def uses_method_loss(self) -> bool:
        """Whether training iterations go through :meth:`compute_loss` (steps > 0, or step 0 if opted in)."""
        return self.step.is_incremental or self.method_loss_at_step0

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        with exit_on_user_error():
            self.check_method_requirements()  # before nnU-Net builds anything
        super().initialize()
        if self.step.is_incremental:
            with exit_on_user_error():
                self._set_up_teacher()
        if self.student_feature_taps and self.uses_method_loss:
            with exit_on_user_error():
                self._student_taps = FeatureTaps(self.network, self.student_feature_taps)
        self.print_to_log_file(f"Incremental step {self.step.index} of {self.step.num_steps} "
                               f"(scenario {self.step.scenario}): old labels {self.step.old_labels}, "
                               f"new labels {self.step.new_labels}; hyperparameters {self.hp}; "
                               f"initial lr {self.initial_lr}")

    def _set_up_teacher(self) -> None:
        teacher_trainer = self.step.teacher.trainer_for(self.__class__.__name__)
        ckpt = teacher_checkpoint_path(nnUNet_results.get() if nnUNet_results.is_set() else None,
                                       self.step.teacher.dataset, teacher_trainer, self.plans_manager.plans_name,
                                       self.configuration_name, self.fold, self.step.teacher.checkpoint,
                                       teacher_step=self.step.index - 1)
        info = load_teacher(ckpt, self.device)
        self._check_teacher_labels(info)
        info.network.decoder.deep_supervision = self.enable_deep_supervision
        widen_student_from_teacher(unwrap_network(self.network), info.network, self.step.n_old_outputs,
                                   self.head_init)
        self.teacher, self.teacher_info = info.network, info
        self.print_to_log_file(f"Teacher: {ckpt} ({info.trainer_name}); student widened from "
                               f"{self.step.n_old_outputs} to {self.label_manager.num_segmentation_heads} outputs")
        if self.teacher_feature_taps:
            self._teacher_taps = FeatureTaps(self.teacher, self.teacher_feature_taps, detach=True)
        fold_folder = os.path.dirname(ckpt)
        if self.needs_teacher_memory:
            self.teacher_memory = ensure_step_memory(fold_folder, self.configuration_name, self.device,
                                                     log=self.print_to_log_file,
                                                     prototype_tap=self.memory_prototype_tap)
        elif os.path.isfile(os.path.join(fold_folder, STEP_MEMORY_FILENAME)):
            # old-class prototypes are carried forward from it when the step ends: read (and check) it now,
            # not after the whole training
            self._carried_memory = StepMemory.load(os.path.join(fold_folder, STEP_MEMORY_FILENAME))

    def _check_teacher_labels(self, info: LoadedTeacher) -> None:
        teacher_labels = info.dataset_json.get("labels", {})
        expected = {name: v for v, name in self.step.label_names.items() if v == 0 or v in self.step.old_labels}
        if {k: v for k, v in teacher_labels.items() if k != "ignore"} != expected:
            raise CIMISError(
                f"The teacher {info.checkpoint_path} knows the labels {teacher_labels}, but this step's old classes "
                f"are {expected}. The teacher belongs to another step or dataset; check the step metadata or "
                f"nnUNet_cimis_teacher.")

    def on_train_start(self):
        super().on_train_start()
        if self.step.is_incremental:
            with exit_on_user_error():
                self._check_no_old_labels_in_masks()
                self.on_incremental_train_start()

    def _check_no_old_labels_in_masks(self) -> None:
        """Refuse a step dataset whose masks contain old classes (from nnU-Net's stored class locations)."""
        from batchgenerators.utilities.file_and_folder_operations import load_pickle, subfiles
        old, new = set(self.step.old_labels), set(self.step.new_labels)
        new_seen = set()
        for pkl in subfiles(self.preprocessed_dataset_folder, suffix=".pkl"):
            locations = load_pickle(pkl).get("class_locations", {})
            new_seen |= {int(k) for k, v in locations.items() if int(k) in new and len(v) > 0}
            present = sorted(int(k) for k, v in locations.items() if int(k) in old and len(v) > 0)
            if present:
                raise CIMISError(
                    f"The preprocessed case {os.path.basename(pkl)[:-4]} contains old classes {present}. A step "
                    f"dataset's masks must label only the step's new classes {self.step.new_labels}; recreate it with "
                    f"nnUNetv2_cimis_make_scenario or nnUNetv2_cimis_add_classes.")
        missing = sorted(new - new_seen)
        if missing:
            names = [self.step.label_names.get(v, str(v)) for v in missing]
            self.print_to_log_file(
                f"WARNING: no training case of this step holds a voxel of the new class(es) {missing} {names}: the "
                f"model cannot learn them here (it only learns background for them). Check the step dataset's masks "
                f"and --classes / the scenario.")

    # ------------------------------------------------------------------ hooks for methods
    def build_method_losses(self) -> None:
        """Build the method's losses and state from ``self.hp`` and ``self.step``; called once, at the end of
        ``__init__`` (plans, configuration and label manager are ready; network and teacher are not). Raise
        ``ValueError`` / ``TypeError`` (or :class:`CIMISError`) for bad hyperparameters. May set
        ``student_feature_taps`` / ``teacher_feature_taps`` as instance attributes."""

    def check_method_requirements(self) -> None:
        """Raise :class:`CIMISError` when something the method needs is missing (an optional package, ...); called
        first in ``initialize()``, so ``nnUNetv2_train`` stops before training, not at the end of a step."""

    def on_incremental_train_start(self) -> None:
        """Called once per run of a step > 0, after teacher, memory and dataloaders are ready."""

    def replay_batch(self, data: torch.Tensor,
                     target: List[torch.Tensor]) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Replayed samples to append to this training batch (steps > 0): ``(images, labels)`` with images
        ``(k, C_in, *patch)`` and labels a list over the scales of ``target`` (``(k, 1, *scale)`` each), or None.

        ``data`` ``(B, C_in, *patch)`` and ``target`` (list over deep-supervision scales) are the real batch, on
        the training device. The base appends them and records ``k`` as ``ctx.n_replayed``; the teacher sees
        the whole batch. Default: no replay."""
        return None

    def compute_loss(self, output: List[torch.Tensor], target: List[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """The training loss of one iteration. Default: :meth:`segmentation_loss` (fine-tuning)."""
        loss = self.segmentation_loss(output, target)
        self.record_loss_terms(segmentation=loss)
        return loss

    def teacher_memory_prototypes(self, tap_hyperparameter: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's step-memory prototypes of its ``n_old`` outputs ``(n_old, C)`` on the device, and which rows
        are valid (seen in training), after checking that the memory was recorded at ``self.memory_prototype_tap``
        (the hyperparameter ``tap_hyperparameter`` in the messages)."""
        memory, n_old, tap = self.teacher_memory, self.step.n_old_outputs, self.memory_prototype_tap
        if memory is None:
            raise CIMISError(f"{type(self).__name__} needs the teacher's step memory (global prototypes of the old "
                             f"classes), but none was loaded.")
        if memory.prototype_tap != tap:
            raise CIMISError(
                f"The teacher's step memory holds prototypes of '{memory.prototype_tap}' but this trainer's "
                f"{tap_hyperparameter} is '{tap}'. Use the same tap (nnUNet_cimis_hparams '{{\"{tap_hyperparameter}\": "
                f"\"{memory.prototype_tap}\"}}'), or recompute the teacher's memory with that tap.")
        if memory.num_labels < n_old:
            raise CIMISError(f"The teacher's step memory has prototypes for labels 0..{memory.num_labels - 1} but the "
                             f"teacher has {n_old} outputs; recompute it with nnUNetv2_cimis_step_memory.")
        return (memory.prototypes[:n_old].detach().float().to(self.device),
                (memory.prototype_counts[:n_old] > 0).to(self.device))

    def over_scales(self, fn: Callable[..., torch.Tensor], *lists) -> torch.Tensor:
        """``sum_s w_s fn(lists[0][s], lists[1][s], ...)`` with nnU-Net's deep-supervision weights ``w_s``
        (``self.deep_supervision_weights``; scales of weight 0 skipped)."""
        return apply_over_scales(fn, self.deep_supervision_weights, *lists)

    def record_loss_terms(self, **terms: torch.Tensor) -> None:
        """Add this iteration's (unweighted) loss terms to the epoch means written to the training log at the
        epoch's end (each term's mean over the iterations that recorded it). Detached, summed on the device: no
        host synchronisation per iteration."""
        if not hasattr(self, "_term_counts"):  # trainer objects built without __init__ (unit tests)
            self._term_sums, self._term_counts = getattr(self, "_term_sums", {}), {}
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def segmentation_loss(self, output: List[torch.Tensor], target: List[torch.Tensor]) -> torch.Tensor:
        """nnU-Net's Dice+CE, with deep supervision when enabled (lists over scales in, scalar out)."""
        if self.enable_deep_supervision:
            return self._segmentation_loss(output, target)
        return self._segmentation_loss(output[0], target[0])

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        """Method state kept across iterations; saved in every checkpoint."""
        return {}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`extra_checkpoint_state` returned."""

    def extend_step_memory(self, memory: StepMemory) -> None:
        """Add method-specific content to the step memory before it is written."""

    # ------------------------------------------------------------------ nnU-Net hooks
    def _build_loss(self):
        self._segmentation_loss = super()._build_loss()
        weights = getattr(self._segmentation_loss, "weight_factors", None)
        self.deep_supervision_weights = ([float(w) for w in weights]
                                         if isinstance(self._segmentation_loss, DeepSupervisionWrapper) else [1.0])
        return _RoutedLoss(self)

    def train_step(self, batch: dict) -> dict:
        with exit_on_user_error():  # label values once per batch, on the host: the losses do not check them on a GPU
            check_batch_labels(batch["target"], self.label_manager.num_segmentation_heads,
                               self.label_manager.ignore_label)
        out = self._train_step(batch)
        self._check_loss_finite(out)
        return out

    def _check_loss_finite(self, out: dict) -> None:
        """Stop a run whose loss is NaN/inf for ``max_nonfinite_iterations`` iterations in a row: the weights are
        then garbage and nnU-Net would go on training and save them without a word."""
        try:
            finite = bool(np.all(np.isfinite(np.asarray(out.get("loss"), dtype=np.float64))))
        except (TypeError, ValueError):
            return
        self._nonfinite_iterations = 0 if finite else getattr(self, "_nonfinite_iterations", 0) + 1
        if self._nonfinite_iterations >= self.max_nonfinite_iterations:
            msg = (f"error: the training loss was not finite (NaN or inf) for {self._nonfinite_iterations} iterations "
                   f"in a row (epoch {self.current_epoch}); stopping {type(self).__name__}. Check the hyperparameters "
                   f"({self.hp}), the learning rate ({self.initial_lr}) and the input data; the last checkpoint "
                   f"written before is kept.")
            self.print_to_log_file(msg)
            raise SystemExit(msg)

    def _train_step(self, batch: dict) -> dict:
        if not self.uses_method_loss:
            return super().train_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        listed = isinstance(batch["target"], (list, tuple))
        target = [t.to(self.device, non_blocking=True) for t in (batch["target"] if listed else [batch["target"]])]
        n_replayed = 0
        if self.step.is_incremental:
            with exit_on_user_error():
                replay = self.replay_batch(data, target)
                if replay is not None:
                    data, target, n_replayed = self._append_replay(data, target, *replay)
        ctx = StepContext(data=data, n_replayed=n_replayed)
        if self.step.is_incremental and self.uses_teacher_outputs:
            ctx.teacher_output, ctx.teacher_features = self.teacher_forward(data)
        self._ctx = ctx
        try:
            return super().train_step(dict(batch, data=data, target=target if listed else target[0]))
        finally:
            self._ctx = None
            if self._student_taps is not None:
                self._student_taps.clear()

    @staticmethod
    def _append_replay(data: torch.Tensor, target: List[torch.Tensor], images: torch.Tensor,
                       labels: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], int]:
        if tuple(images.shape[1:]) != tuple(data.shape[1:]):
            raise CIMISError(f"The replayed images have shape {tuple(images.shape[1:])} (channels, spatial) but the "
                             f"training data has {tuple(data.shape[1:])}; the replay source belongs to another "
                             f"dataset or plans.")
        if len(labels) != len(target) or any(y.shape[1:] != t.shape[1:] for y, t in zip(labels, target)):
            raise CIMISError(f"The replayed labels have shapes {[tuple(y.shape) for y in labels]} but the targets "
                             f"{[tuple(t.shape) for t in target]}.")
        data = torch.cat([data, images.to(data.device, data.dtype)])
        target = [torch.cat([t, y.to(t.device, t.dtype)]) for t, y in zip(target, labels)]
        return data, target, images.shape[0]

    @torch.no_grad()
    def teacher_forward(self, data: torch.Tensor) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
        """The teacher's logits (list over deep-supervision scales) and tap features on ``data``, with
        nnU-Net's autocast rule; the teacher taps are cleared afterwards."""
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self.teacher(data)
        features = {}
        if self._teacher_taps is not None:
            features = dict(self._teacher_taps.features)
            self._teacher_taps.clear()
        return (list(out) if isinstance(out, (list, tuple)) else [out]), features

    def validation_step(self, batch: dict) -> dict:
        try:
            return super().validation_step(batch)
        finally:
            if self._student_taps is not None:
                self._student_taps.clear()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        if self._term_sums:
            parts = ", ".join(f"{k} {float(v) / self._term_counts[k]:.4f}" for k, v in self._term_sums.items())
            name = self.method_name or self.__class__.__name__.replace("nnUNetTrainer", "")
            self.print_to_log_file(f"{name} mean terms this epoch: {parts}")
        self._term_sums, self._term_counts = {}, {}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with the method state (``cimis_state``) in the same dict, written in one atomic
        save: nnU-Net builds its dict as always; its ``torch.save`` of that file is routed through
        :func:`_atomic_save_with_state` (the state added, a temporary file renamed into place), so a kill at any
        moment leaves either the previous complete checkpoint or the new complete one."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        state = {"step": self.step.index, "hyperparameters": self.hp, "method": self.extra_checkpoint_state()}
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and os.fspath(f) == filename and isinstance(obj, dict):
                return _atomic_save_with_state(real_save, dict(obj, **{CHECKPOINT_KEY: state}), filename,
                                               *args, **kwargs)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
        try:
            super().save_checkpoint(filename)
        finally:
            torch.save = real_save

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Load weights-only (see :mod:`nnunetv2_cimis.safe_load`) before handing the dict to nnU-Net, then
        restore the method state."""
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            with exit_on_user_error():
                checkpoint = load_weights_only(filename_or_checkpoint, "checkpoint", map_location=self.device)
                if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
                    raise CIMISError(f"{filename_or_checkpoint} is not an nnU-Net checkpoint (no 'network_weights').")
                # nnU-Net's load_checkpoint reads the file itself (weights_only=False): serve it what we loaded
                with torch_load_weights_only("checkpoint", {filename_or_checkpoint: checkpoint}):
                    super().load_checkpoint(filename_or_checkpoint)
        else:
            super().load_checkpoint(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            self.print_to_log_file(
                f"WARNING: the checkpoint has no '{CHECKPOINT_KEY}' (it was not written by this package's trainer, "
                f"or an older version was killed while saving it): the method state "
                f"({type(self).__name__}: thresholds, prototypes, ...) is recomputed instead of restored, so this "
                f"run does not continue exactly where it stopped.")
            return
        if state.get("hyperparameters") != self.hp:
            self.print_to_log_file(f"WARNING: the checkpoint was trained with hyperparameters "
                                   f"{state.get('hyperparameters')}, now {self.hp}. Using the current ones.")
        self.load_extra_checkpoint_state(state.get("method", {}))

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            with exit_on_user_error():
                self.write_step_memory()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation; at steps > 0 scored against step references (new classes from the masks,
        old ones from the teacher), see :mod:`nnunetv2_cimis.training.validation`. Skipped with
        ``nnUNet_cimis_final_validation=0``."""
        if skip_final_validation(self):
            return
        if not self.step.is_incremental:
            return super().perform_actual_validation(save_probabilities)
        from nnunetv2_cimis.training.validation import perform_step_validation
        with exit_on_user_error():
            perform_step_validation(self, super().perform_actual_validation, save_probabilities)

    def write_step_memory(self) -> str:
        """Compute this step's memory from its training cases and save it next to the checkpoint."""
        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        labels = {v: n for v, n in self.step.label_names.items()}
        memory = compute_step_memory(unwrap_network(self.network), dataset, tr_keys,
                                     self.configuration_manager.patch_size, labels, self.device,
                                     prototype_tap=self.memory_prototype_tap,
                                     bank_size=self.memory_label_bank_size)
        old_memory = self.teacher_memory if self.teacher_memory is not None else self._carried_memory
        memory = carry_forward(memory, old_memory, self.step.old_labels)
        self.extend_step_memory(memory)
        path = os.path.join(self.output_folder, STEP_MEMORY_FILENAME)
        memory.save(path)
        self.print_to_log_file(f"Step memory written to {path}")
        return path


def skip_final_validation(trainer: nnUNetTrainer) -> bool:
    """True (and a line in the training log) when ``nnUNet_cimis_final_validation=0`` switches the final
    validation off."""
    with exit_on_user_error():
        enabled = final_validation_enabled()
    if not enabled:
        trainer.print_to_log_file(f"Final validation skipped ({ENV_FINAL_VALIDATION}=0); validate this model later "
                                  f"with nnUNetv2_train ... --val")
    return not enabled


def _atomic_save_with_state(real_save, checkpoint: dict, filename: str, *args, **kwargs) -> None:
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        real_save(checkpoint, tmp, *args, **kwargs)
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class nnUNetTrainerFT(nnUNetTrainerIncremental):
    """Fine-tuning, the lower bound: the widened student trained with nnU-Net's Dice+CE on the step's data
    only (no teacher term). At step 0 it is plain nnU-Net training plus the step memory.

    Hyperparameter ``head_init`` (docs/trainers_baselines.md): ``"random"`` (default, MiB's code) or ``"mib"``
    (MiB's initialisation), which the 2D demo uses: from one step-0 model of the 2D phantom, random rows reached
    0.48 pseudo Dice on a new structure after 600 iterations, MiB's initialisation 0.76 after 200."""

    uses_teacher_outputs = False
    head_init = "random"
    default_hyperparameters = {"head_init": head_init}

    def build_method_losses(self) -> None:
        if self.hp["head_init"] not in HEAD_INITS:  # checked at step 0 too, where no head is widened
            raise ValueError(f"head_init must be 'random' or 'mib', got {self.hp['head_init']!r}")
        self.head_init = self.hp["head_init"]


class nnUNetTrainerJoint(nnUNetTrainer):
    """The joint upper bound: plain ``nnUNetTrainer`` on the joint dataset (all training cases of every step,
    all labels), with the package's training length settings so it can be compared at equal budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error():
            apply_training_length(self)
            apply_cpu_threads(self.device)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, skipped with ``nnUNet_cimis_final_validation=0``."""
        if not skip_final_validation(self):
            super().perform_actual_validation(save_probabilities)

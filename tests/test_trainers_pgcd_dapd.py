"""Tests of the PGCD / DAPD trainers.

The first tests drive the trainers' loss wiring with a real (tiny) nnU-Net U-Net, real feature taps and a
step memory, without nnU-Net's data pipeline; the end-to-end test at the bottom trains a few iterations on
the tiny phantom scenario of ``tests/e2e_utils.py``.
"""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.networks.taps import FeatureTaps
from nnunetv2_cimis.losses.deep_supervision import deep_supervision_weights
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.losses.pgcd import PrototypeGuidedCalibrationDistillation
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.training.incremental_trainer import StepContext
from nnunetv2_cimis.training.trainers.pgcd_dapd import (nnUNetTrainerDAPD, nnUNetTrainerPGCD,
                                                        nnUNetTrainerPGCDDAPD)

N_OLD, N_TOTAL, C_FEAT = 3, 4, 16


def _unet(seed):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), 1, N_TOTAL, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU, deep_supervision=True)


def _memory(tap="decoder.stages.-2", counts=(10.0, 5.0, 0.0)):
    labels = {0: "background", 1: "a", 2: "b"}
    return StepMemory(labels=labels, prototype_tap=tap, prototypes=torch.randn(N_OLD, C_FEAT),
                      prototype_counts=torch.tensor(counts, dtype=torch.float64))


def _bare_trainer(cls, memory, hparams=None):
    """A trainer object with just what the loss wiring uses (no plans, no data, no nnU-Net initialise)."""
    t = cls.__new__(cls)
    t.hp = dict(cls.default_hyperparameters, **(hparams or {}))
    t._build_method_losses()
    t.device = torch.device("cpu")
    t.step = SimpleNamespace(n_old_outputs=N_OLD)
    t.teacher_memory = memory
    t.label_manager = SimpleNamespace(has_ignore_label=False, ignore_label=None)
    t.configuration_manager = SimpleNamespace(batch_dice=False)
    t.deep_supervision_weights = deep_supervision_weights(2)  # what nnU-Net's DeepSupervisionWrapper holds
    t.print_to_log_file = lambda *a, **k: None
    from nnunetv2_cimis.losses.prototypes import EMAPrototype
    t.background_prototype = EMAPrototype(t.hp["background_momentum"])
    t._term_sums, t._term_iterations = {}, 0
    t.on_incremental_train_start()
    return t


def _iteration(trainer, seed=0):
    student, teacher = _unet(1), _unet(2)
    s_taps = FeatureTaps(student, {"proto": trainer.hp["prototype_tap"]})
    t_taps = FeatureTaps(teacher, {"proto": trainer.hp["prototype_tap"]}, detach=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 16, 16, 16, generator=g)
    target0 = torch.zeros(2, 1, 16, 16, 16)
    target0[:, :, 4:8, 4:8, 4:8] = 3  # the new class
    target = [target0, target0[:, :, ::2, ::2, ::2]]
    with torch.no_grad():
        t_out = teacher(x)
    ctx = StepContext(data=x, teacher_output=[o[:, :N_OLD] for o in t_out],
                      teacher_features=dict(t_taps.features))
    out = student(x)
    ctx.student_features = dict(s_taps.features)
    return student, out, target, ctx


def test_full_method_loss_is_finite_and_updates_background():
    trainer = _bare_trainer(nnUNetTrainerPGCDDAPD, _memory())
    assert trainer.background_prototype.is_set  # initialised from the memory's background row
    before = trainer.background_prototype.value.clone()
    student, out, target, ctx = _iteration(trainer)
    loss = trainer.compute_loss(list(out), target, ctx)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert not torch.equal(before, trainer.background_prototype.value)
    assert set(trainer._term_sums) == {"segmentation", "pgcd", "dapd"}


def test_pgcd_trainer_loss_is_segmentation_plus_weighted_pgcd():
    trainer = _bare_trainer(nnUNetTrainerPGCD, _memory())
    assert trainer.hp["dapd_weight"] == 0.0
    student, out, target, ctx = _iteration(trainer)
    loss = trainer.compute_loss(list(out), target, ctx)
    # recompute independently: unbiased Dice+CE and PGCD with weights from the (updated) prototypes
    w = deep_supervision_weights(2)
    seg = UnbiasedDiceCELoss(N_OLD)
    protos, valid = trainer.current_global_prototypes()
    pgcd = PrototypeGuidedCalibrationDistillation("softmax", 0.5, divergence="binary")
    weights = pgcd.calibration_weights(ctx.teacher_features["proto"], protos, valid)
    expected = sum(w[i] * (seg(out[i], target[i]) + 10.0 * pgcd(out[i], ctx.teacher_output[i], weights))
                   for i in range(2) if w[i] > 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "dapd" not in trainer._term_sums


def test_dapd_trainer_uses_uniform_distillation():
    trainer = _bare_trainer(nnUNetTrainerDAPD, _memory())
    assert trainer.hp["pgcd_weighting"] == "uniform" and trainer.hp["pgcd_divergence"] == "categorical"
    assert trainer.hp["dapd_weight"] > 0
    _, out, target, ctx = _iteration(trainer)
    assert torch.isfinite(trainer.compute_loss(list(out), target, ctx))


def test_memory_without_background_prototype_starts_from_first_batch():
    trainer = _bare_trainer(nnUNetTrainerPGCDDAPD, _memory(counts=(0.0, 0.0, 0.0)))
    assert not trainer.background_prototype.is_set
    _, out, target, ctx = _iteration(trainer)
    assert torch.isfinite(trainer.compute_loss(list(out), target, ctx))
    assert trainer.background_prototype.is_set and trainer.background_prototype.num_updates == 1


def test_checkpoint_state_round_trip():
    trainer = _bare_trainer(nnUNetTrainerPGCDDAPD, _memory())
    _, out, target, ctx = _iteration(trainer)
    trainer.compute_loss(list(out), target, ctx)
    state = trainer.extra_checkpoint_state()
    other = _bare_trainer(nnUNetTrainerPGCDDAPD, _memory())
    other.load_extra_checkpoint_state(state)
    assert torch.equal(other.background_prototype.value, trainer.background_prototype.value)
    assert other.background_prototype.num_updates == 1


def test_tap_mismatch_and_bad_hyperparameters_raise():
    with pytest.raises(CIMISError, match="prototype_tap"):
        _bare_trainer(nnUNetTrainerPGCDDAPD, _memory(tap="decoder.stages.-1"))
    with pytest.raises(CIMISError, match="step memory"):
        _bare_trainer(nnUNetTrainerPGCDDAPD, None)
    with pytest.raises(CIMISError, match="pgcd_weighting|weighting"):
        _bare_trainer(nnUNetTrainerPGCDDAPD, _memory(), {"pgcd_weighting": "max"})
    with pytest.raises(CIMISError, match="dapd_weight"):
        _bare_trainer(nnUNetTrainerPGCDDAPD, _memory(), {"dapd_weight": -1})
    with pytest.raises(CIMISError, match="old_region_confidence"):
        _bare_trainer(nnUNetTrainerPGCDDAPD, _memory(), {"old_region_confidence": 2})


def test_feature_channel_mismatch_is_a_clear_error():
    trainer = _bare_trainer(nnUNetTrainerPGCDDAPD, _memory())
    trainer._old_prototypes = torch.randn(N_OLD, C_FEAT + 1)
    _, out, target, ctx = _iteration(trainer)
    with pytest.raises(SystemExit, match="channels"):
        trainer.compute_loss(list(out), target, ctx)


# ---------------------------------------------------------------------------------------------- end to end
def _terms_from_log(folder):
    import glob
    import re
    logs = sorted(glob.glob(os.path.join(folder, "training_log_*.txt")))
    assert logs, f"no training log in {folder}"
    with open(logs[-1]) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if "PGCD/DAPD mean terms this epoch" in ln]
    assert lines, text[-2000:]
    return {k: float(v) for k, v in re.findall(r"(\w+) (-?[\d.]+(?:e-?\d+)?|nan|inf)", lines[-1].split(": ", 1)[1])}


@pytest.mark.e2e
def test_e2e_full_method_trains_step1_and_resumes_background_prototype(tiny_scenario):
    from e2e_utils import build_trainer, model_folder, train
    env, ds1 = tiny_scenario["env"], tiny_scenario["step_datasets"][1]
    train(ds1, "nnUNetTrainerPGCDDAPD", env)
    folder = model_folder(env, ds1, "nnUNetTrainerPGCDDAPD")
    terms = _terms_from_log(folder)
    assert set(terms) == {"segmentation", "pgcd", "dapd"}
    assert all(math.isfinite(v) for v in terms.values()), terms
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    saved = ckpt["cimis_state"]["method"]["background_prototype"]
    assert saved["value"] is not None and saved["num_updates"] == 2  # two training iterations
    assert torch.isfinite(saved["value"]).all()
    memory = StepMemory.load(os.path.join(folder, "step_memory.pth"))
    assert memory.prototype_tap == "decoder.stages.-2"
    assert torch.equal(memory.extra["pgcd_dapd_background_prototype"], saved["value"])
    # --c: the checkpoint restores the EMA background prototype exactly
    trainer = build_trainer(ds1, nnUNetTrainerPGCDDAPD, continue_training=True)
    trainer.load_checkpoint(os.path.join(folder, "checkpoint_final.pth"))
    assert torch.equal(trainer.background_prototype.value, saved["value"])
    assert trainer.background_prototype.num_updates == 2


@pytest.mark.e2e
@pytest.mark.parametrize("trainer_class", [nnUNetTrainerPGCD, nnUNetTrainerDAPD])
def test_e2e_variants_take_finite_train_steps(tiny_scenario, trainer_class):
    from e2e_utils import build_trainer
    trainer = build_trainer(tiny_scenario["step_datasets"][1], trainer_class)
    trainer.on_train_start()
    losses = [trainer.train_step(next(trainer.dataloader_train))["loss"] for _ in range(2)]
    assert all(np.isfinite(float(v)) for v in losses), losses
    assert trainer.background_prototype.num_updates == 2
    expected = {"segmentation", "pgcd"} | ({"dapd"} if trainer_class is nnUNetTrainerDAPD else set())
    assert set(trainer._term_sums) == expected

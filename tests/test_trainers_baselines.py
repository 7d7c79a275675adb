"""Tests of the baseline trainers LwF, ILT, MiB and PLOP.

The first tests drive each trainer's ``compute_loss`` with a real (tiny) U-Net of dynamic_network_architectures,
real feature taps and teacher outputs, without nnU-Net's data pipeline, and compare it with the losses
recomputed independently. The ``e2e`` tests at the bottom build the trainers on the tiny phantom scenario of
``tests/e2e_utils.py`` (step 0 trained by ``nnUNetTrainerFT``), run training iterations on CPU, check
PLOP's thresholds across ``save_checkpoint`` / ``load_checkpoint``, and run ``nnUNetv2_train`` /
``nnUNetv2_predict -tr`` once.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.networks.taps import FeatureTaps
from nnunetv2_cimis.losses.deep_supervision import deep_supervision_weights
from nnunetv2_cimis.losses.lwf import LwFDistillationLoss
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation
from nnunetv2_cimis.losses.plop import LocalPOD, PseudoLabelDiceCELoss
from nnunetv2_cimis.training.incremental_trainer import StepContext
from nnunetv2_cimis.training.trainers.ilt import nnUNetTrainerILT
from nnunetv2_cimis.training.trainers.lwf import nnUNetTrainerLwF
from nnunetv2_cimis.training.trainers.mib import nnUNetTrainerMiB
from nnunetv2_cimis.training.trainers.plop import nnUNetTrainerPLOP

N_OLD, N_TOTAL = 3, 4  # background + 2 old classes; one new class (label 3)


def _unet(seed, outputs):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(seed)
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2))  # anisotropic, like a thick-slice CT plan
    return PlainConvUNet(1, 4, (4, 8, 16, 16), torch.nn.Conv3d, 3, strides, 1, outputs, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU, deep_supervision=True)


def _seg_stub(output, target):
    """Stands in for nnU-Net's Dice+CE in the bare trainers (a known function of the outputs)."""
    return sum(o.float().mean() for o in output)


def _bare_trainer(cls, hparams=None):
    """A trainer object with just what the loss wiring reads (no plans, no data, no nnU-Net initialise)."""
    t = cls.__new__(cls)
    t.hp = dict(cls.default_hyperparameters, **(hparams or {}))
    t.device = torch.device("cpu")
    t.step = SimpleNamespace(n_old_outputs=N_OLD, is_incremental=True)
    t.label_manager = SimpleNamespace(ignore_label=None, num_segmentation_heads=N_TOTAL)
    t.configuration_manager = SimpleNamespace(batch_dice=False, network_arch_init_kwargs={"n_stages": 4},
                                              patch_size=[8, 16, 16], spacing=[2.0, 1.0, 1.0])
    t.segmentation_loss = _seg_stub
    t.deep_supervision_weights = deep_supervision_weights(3)  # what nnU-Net's DeepSupervisionWrapper holds
    t.print_to_log_file = lambda *a, **k: None
    t._build_method_losses()
    return t


def _iteration(trainer, all_background=False, seed=0, teacher_seed=2):
    student, teacher = _unet(1, N_TOTAL), _unet(teacher_seed, N_OLD)
    s_taps = FeatureTaps(student, trainer.student_feature_taps) if trainer.student_feature_taps else None
    t_taps = FeatureTaps(teacher, trainer.teacher_feature_taps, detach=True) if trainer.teacher_feature_taps else None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 16, 16, generator=g)
    target0 = torch.zeros(2, 1, 8, 16, 16)
    if not all_background:
        target0[:, :, 2:6, 4:10, 4:10] = 3  # the new class
    target = [target0, target0[:, :, :, ::2, ::2], target0[:, :, ::2, ::4, ::4]]
    with torch.no_grad():
        t_out = list(teacher(x))
    ctx = StepContext(data=x, teacher_output=t_out, teacher_features=dict(t_taps.features) if t_taps else {})
    out = list(student(x))
    ctx.student_features = dict(s_taps.features) if s_taps else {}
    assert [o.shape[2:] for o in out] == [t.shape[2:] for t in target]
    return student, out, target, ctx


def test_lwf_loss_is_segmentation_plus_100_kd_over_scales():
    trainer = _bare_trainer(nnUNetTrainerLwF)
    _, out, target, ctx = _iteration(trainer)
    w = deep_supervision_weights(3)
    kd = LwFDistillationLoss()
    expected = _seg_stub(out, target) + 100.0 * sum(w[i] * kd(out[i], ctx.teacher_output[i]) for i in range(2))
    assert trainer.compute_loss(out, target, ctx).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ilt_adds_bottleneck_mse():
    trainer = _bare_trainer(nnUNetTrainerILT, {"feature_weight": 2.0})
    assert trainer.student_feature_taps == {"bottleneck": "encoder.stages.-1"}
    student, out, target, ctx = _iteration(trainer)
    fs, ft = ctx.student_features["bottleneck"], ctx.teacher_features["bottleneck"]
    assert fs.shape[1] == 16  # the deepest encoder stage
    lwf = nnUNetTrainerLwF.compute_loss(trainer, out, target, ctx)
    loss = trainer.compute_loss(out, target, ctx)
    assert loss.item() == pytest.approx((lwf + 2.0 * ((fs - ft) ** 2).mean()).item(), rel=1e-5)
    loss.backward()
    assert student.encoder.stages[-1][0].convs[0].conv.weight.grad is not None


@pytest.mark.parametrize("all_background", [False, True])
def test_mib_loss_is_unbiased_dice_ce_plus_10_unkd(all_background):
    trainer = _bare_trainer(nnUNetTrainerMiB)
    student, out, target, ctx = _iteration(trainer, all_background=all_background)
    w = deep_supervision_weights(3)
    seg, kd = UnbiasedDiceCELoss(N_OLD), UnbiasedKnowledgeDistillation(N_OLD)
    expected = sum(w[i] * (seg(out[i], target[i]) + 10.0 * kd(out[i], ctx.teacher_output[i])) for i in range(2))
    loss = trainer.compute_loss(out, target, ctx)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_bad_hyperparameters_are_value_errors_before_the_trainer_runs():
    with pytest.raises(ValueError, match="kd_weight"):
        _bare_trainer(nnUNetTrainerMiB, {"kd_weight": -1.0})
    with pytest.raises(ValueError, match="alpha"):
        _bare_trainer(nnUNetTrainerLwF, {"kd_alpha": 0.0})
    with pytest.raises(ValueError, match="feature_weight"):
        _bare_trainer(nnUNetTrainerILT, {"feature_weight": -1.0})
    with pytest.raises(CIMISError, match="pod_feature_taps"):
        _bare_trainer(nnUNetTrainerPLOP, {"pod_feature_taps": 3})
    with pytest.raises(ValueError, match="threshold_num_batches"):
        _bare_trainer(nnUNetTrainerPLOP, {"threshold_num_batches": -1})


def _plop_with_thresholds(hparams=None):
    trainer = _bare_trainer(nnUNetTrainerPLOP, hparams)
    student, out, target, ctx = _iteration(trainer)
    trainer.pseudo_labeller.accumulate(ctx.teacher_output[0], target[0])
    trainer.pseudo_labeller.compute_thresholds()
    return trainer, student, out, target, ctx


def test_plop_configuration_from_plans():
    trainer = _bare_trainer(nnUNetTrainerPLOP)
    assert list(trainer.student_feature_taps.values()) == ["encoder.stages.1", "encoder.stages.2",
                                                           "encoder.stages.3", "decoder.stages.-1"]
    assert trainer.teacher_feature_taps == trainer.student_feature_taps
    assert trainer.pod_loss.pod.extent == (16.0, 16.0, 16.0)  # 8 x 2 mm, 16 x 1 mm, 16 x 1 mm
    assert trainer.pod_loss.schedule_factor == pytest.approx(2.0)  # sqrt(4 / 1)
    custom = _bare_trainer(nnUNetTrainerPLOP, {"pod_feature_taps": ["encoder.stages.-1"],
                                               "pod_scales": [1, [1, 2, 2]], "pod_physical_regions": False})
    assert list(custom.student_feature_taps.values()) == ["encoder.stages.-1"]
    assert custom.pod_loss.pod.scales == [1, (1, 2, 2)] and custom.pod_loss.pod.extent is None


def test_plop_loss_is_pseudo_label_dice_ce_plus_pod():
    trainer, student, out, target, ctx = _plop_with_thresholds()
    w = deep_supervision_weights(3)
    seg_fn = PseudoLabelDiceCELoss()
    seg = 0.0
    for i in range(2):
        pseudo, weights = trainer.pseudo_labeller(ctx.teacher_output[i], target[i])
        assert (pseudo[target[i][:, 0] == 3] == 3).all()
        seg = seg + w[i] * seg_fn(out[i], pseudo, weights)
    pod = LocalPOD(extent=(16.0, 16.0, 16.0))
    names = trainer.pod_tap_names
    feats = sum(0.01 * pod(ctx.student_features[k], ctx.teacher_features[k]) for k in names)
    merged = [torch.cat([o[:, :1] + o[:, N_OLD:].sum(1, keepdim=True), o[:, 1:N_OLD]], 1) for o in out]
    logits = 0.0005 * sum(w[i] * pod(merged[i], ctx.teacher_output[i]) for i in range(2))
    expected = seg + 2.0 * (feats + logits) / (len(names) + 1)
    loss = trainer.compute_loss(out, target, ctx)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_plop_batch_without_new_class_is_finite():
    trainer, _, _, _, _ = _plop_with_thresholds()
    _, out, target, ctx = _iteration(trainer, all_background=True, seed=1)
    assert torch.isfinite(trainer.compute_loss(out, target, ctx))


def test_plop_gradient_finite_when_student_encoder_equals_teacher():
    """At a step's first iteration the student is a copy of the teacher: POD distances are exactly 0."""
    trainer, *_ = _plop_with_thresholds()
    student, out, target, ctx = _iteration(trainer, teacher_seed=1)  # same seed: identical encoders
    assert torch.equal(ctx.student_features["pod0"], ctx.teacher_features["pod0"])
    trainer.compute_loss(out, target, ctx).backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_plop_thresholds_in_extra_checkpoint_state():
    trainer, *_ = _plop_with_thresholds()
    state = trainer.extra_checkpoint_state()
    other = _bare_trainer(nnUNetTrainerPLOP)
    assert not other.pseudo_labeller.has_thresholds
    other.load_extra_checkpoint_state(state)
    assert other.pseudo_labeller.has_thresholds
    assert torch.equal(other.pseudo_labeller.thresholds, trainer.pseudo_labeller.thresholds)


# ------------------------------------------------------------------ end to end on the tiny phantom scenario
BASELINES = [nnUNetTrainerLwF, nnUNetTrainerILT, nnUNetTrainerMiB, nnUNetTrainerPLOP]
PLOP_FAST = json.dumps({"nnUNetTrainerPLOP": {"threshold_num_batches": 2}})


def _started_trainer(dataset, cls):
    from e2e_utils import build_trainer
    trainer = build_trainer(dataset, cls)
    trainer.on_train_start()
    return trainer


@pytest.mark.e2e
@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.__name__)
def test_trainer_runs_training_iterations(tiny_scenario, cls, monkeypatch):
    monkeypatch.setenv("nnUNet_cimis_hparams", PLOP_FAST)
    trainer = _started_trainer(tiny_scenario["step_datasets"][1], cls)
    assert trainer.teacher is not None and trainer.initial_lr == pytest.approx(1e-3)
    for _ in range(2):
        loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
        assert torch.isfinite(torch.as_tensor(loss)).all()
    if cls is nnUNetTrainerPLOP:
        assert trainer.pseudo_labeller.has_thresholds


@pytest.mark.e2e
def test_plop_thresholds_survive_checkpoint(tiny_scenario, tmp_path, monkeypatch):
    from e2e_utils import build_trainer
    monkeypatch.setenv("nnUNet_cimis_hparams", PLOP_FAST)
    dataset = tiny_scenario["step_datasets"][1]
    trainer = _started_trainer(dataset, nnUNetTrainerPLOP)
    trainer.train_step(next(trainer.dataloader_train))
    thresholds = trainer.pseudo_labeller.thresholds.clone()
    ckpt = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["cimis_state"]["method"]["pseudo_labeller"]
    assert torch.equal(saved["thresholds"], thresholds)

    resumed = build_trainer(dataset, nnUNetTrainerPLOP, continue_training=True)
    resumed.load_checkpoint(ckpt)  # what nnUNetv2_train --c does before run_training
    assert resumed.pseudo_labeller.has_thresholds
    assert torch.equal(resumed.pseudo_labeller.thresholds, thresholds)

    def must_not_recompute():
        raise AssertionError("thresholds were recomputed on resume")

    monkeypatch.setattr(resumed, "compute_entropy_thresholds", must_not_recompute)
    resumed.on_train_start()
    assert torch.equal(resumed.pseudo_labeller.thresholds, thresholds)
    assert torch.isfinite(torch.as_tensor(resumed.train_step(next(resumed.dataloader_train))["loss"])).all()


@pytest.mark.e2e
def test_cli_train_and_predict_find_the_trainers(tiny_scenario, tmp_path):
    """nnUNetv2_train -tr nnUNetTrainerMiB then nnUNetv2_predict -tr with the same name (one epoch, 2 iterations)."""
    from e2e_utils import CONFIGURATION, PLANS, model_folder, train
    env = tiny_scenario["env"]
    dataset = tiny_scenario["step_datasets"][1]
    train(dataset, "nnUNetTrainerMiB", env)
    folder = model_folder(env, dataset, "nnUNetTrainerMiB")
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerMiB" and "cimis_state" in ckpt
    with open(os.path.join(env["nnUNet_raw"], dataset, "dataset.json")) as f:
        cases = json.load(f)["dataset"]  # step datasets list their images (no copies)
    image = next(iter(cases.values()))["images"][0]
    image = image if os.path.isabs(image) else os.path.join(env["nnUNet_raw"], dataset, image)
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(image, inp / os.path.basename(image))
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict")
    cmd = [exe, "-i", str(inp), "-o", str(tmp_path / "out"), "-d", dataset, "-c", CONFIGURATION, "-p", PLANS,
           "-tr", "nnUNetTrainerMiB", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    proc = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".nii.gz")]) == 1

"""Tests of nnUNetTrainerMOSInv: loss wiring, synthetic batches, deep-supervision labels, step memory, and
(end to end, when tests/e2e_utils.py provides the tiny phantom scenario) a real nnU-Net step with replay."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.deep_supervision import deep_supervision_weights
from nnunetv2_cimis.losses.lwf import LwFDistillationLoss
from nnunetv2_cimis.losses.mib import UnbiasedDiceCELoss
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.training.incremental_trainer import StepContext
from nnunetv2_cimis.training.trainers.mosinv import downsample_labels_like, nnUNetTrainerMOSInv


def stub_trainer(real_loss="dice_ce", n_old=3, **hp):
    """A trainer object without nnU-Net set-up: only what compute_loss / synthetic_batch read."""
    tr = object.__new__(nnUNetTrainerMOSInv)
    tr.hp = dict(nnUNetTrainerMOSInv.default_hyperparameters, real_loss=real_loss, **hp)
    tr.distillation = LwFDistillationLoss(alpha=1.0)
    tr.unbiased_segmentation = UnbiasedDiceCELoss(n_old) if real_loss == "unbiased" else None
    tr.enable_deep_supervision = True
    tr.calls = []

    def fake_segmentation_loss(output, target):  # records which samples it saw; value = batch size
        tr.calls.append((output[0].shape[0], [t[:, 0, 0, 0, 0].tolist() for t in target]))
        return torch.tensor(float(output[0].shape[0]))

    tr._segmentation_loss = fake_segmentation_loss
    tr.device = torch.device("cpu")
    return tr


def _np_lwf(student, teacher):
    n_old = teacher.shape[1]
    z = student[:, :n_old]
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    q = np.exp(teacher) / np.exp(teacher).sum(1, keepdims=True)
    return -(q * log_p).mean(1).mean()


def test_nnunet_style_label_downsampling():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    y = torch.randint(0, 4, (2, 1, 12, 10, 8))
    ref = DownsampleSegForDSTransform([[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.5, 0.5]])(segmentation=y[:, 0])
    for k, like_shape in enumerate([(12, 10, 8), (6, 5, 4), (3, 5, 4)]):
        out = downsample_labels_like(y, torch.zeros((2, 3) + like_shape))
        assert out.shape == (2, 1) + like_shape and out.dtype == torch.float32
        np.testing.assert_array_equal(out[:, 0].numpy(), ref["segmentation"][k].numpy())


def test_compute_loss_splits_real_and_synthetic():
    torch.manual_seed(0)
    tr = stub_trainer(real_loss="dice_ce", kd_weight=2.0, synthetic_seg_weight=0.5)
    b, k, c, n_old = 2, 1, 4, 3
    shapes = [(4, 4, 4), (2, 2, 2), (1, 1, 1)]
    output = [torch.randn(b + k, c, *s) for s in shapes]
    target = [torch.full((b + k, 1, *s), 0.0) for s in shapes]
    for t in target:
        t[b:] = 7.0  # marks the synthetic samples
    teacher = [torch.randn(b + k, n_old, *s) for s in shapes]
    ctx = StepContext(data=torch.zeros(b + k, 1), teacher_output=teacher, n_replayed=k)
    tr.deep_supervision_weights = deep_supervision_weights(3)  # what nnU-Net's DeepSupervisionWrapper holds
    loss = tr.compute_loss(output, target, ctx)
    # DS weights for 3 scales: (1, 1/2, 0) / 1.5
    w = [2 / 3, 1 / 3, 0.0]
    kd = sum(wi * _np_lwf(o[b:].numpy(), t[b:].numpy()) for wi, o, t in zip(w, output, teacher))
    expected = b + 0.5 * k + 2.0 * kd  # fake segmentation loss = batch size it sees
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    (n_real, t_real), (n_syn, t_syn) = tr.calls
    assert n_real == b and all(v == [0.0] * b for v in t_real)
    assert n_syn == k and all(v == [7.0] * k for v in t_syn)


def test_compute_loss_without_synthetic_and_unbiased_real_loss():
    torch.manual_seed(1)
    tr = stub_trainer(real_loss="unbiased")
    output = [torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 2, 2, 2)]
    target = [torch.randint(0, 2, (2, 1, 4, 4, 4)).float() * 3, torch.randint(0, 2, (2, 1, 2, 2, 2)).float() * 3]
    ctx = StepContext(data=torch.zeros(2, 1), teacher_output=None)
    tr.deep_supervision_weights = deep_supervision_weights(2)
    loss = tr.compute_loss(output, target, ctx)  # no synthetic sample: real loss only, teacher not needed
    expected = UnbiasedDiceCELoss(3)(output[0], target[0])  # 2 scales: weights (1, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert tr.calls == []


def test_compute_loss_needs_teacher_output_for_kd():
    from nnunetv2_cimis.errors import CIMISError

    tr = stub_trainer()
    tr.deep_supervision_weights = [1.0]
    output = [torch.randn(3, 4, 2, 2, 2)]
    ctx = StepContext(data=torch.zeros(3, 1), teacher_output=None, n_replayed=1)
    with pytest.raises(CIMISError, match="teacher"):
        tr.compute_loss(output, [torch.zeros(3, 1, 2, 2, 2)], ctx)


def test_synthetic_batch_flips_image_and_label_together():
    torch.manual_seed(0)
    tr = stub_trainer()
    lab = torch.randint(0, 3, (5, 1, 6, 6, 6)).to(torch.uint8)
    tr.synthetic_labels = lab
    tr.synthetic_images = lab.float() * 10  # image = 10 x label, so flips must keep them aligned
    targets = [torch.zeros(2, 1, 6, 6, 6), torch.zeros(2, 1, 3, 3, 3)]
    flipped_any = False
    for _ in range(5):
        x, ys = tr.synthetic_batch(4, targets)
        assert x.shape == (4, 1, 6, 6, 6) and [y.shape for y in ys] == [(4, 1, 6, 6, 6), (4, 1, 3, 3, 3)]
        torch.testing.assert_close(x / 10, ys[0])
        torch.testing.assert_close(ys[1], downsample_labels_like(ys[0], targets[1]))
        flipped_any |= not any(torch.equal(ys[0][i].to(torch.uint8), lab[j]) for i in range(4) for j in range(5))
    assert flipped_any


def test_synthetic_per_batch_ratio():
    tr = stub_trainer(synthetic_ratio=0.5)
    assert [tr._synthetic_per_batch(b) for b in (1, 2, 4)] == [1, 1, 2]
    tr.hp["synthetic_ratio"] = 0.0
    assert tr._synthetic_per_batch(4) == 0


def test_extend_step_memory_carries_conditioning_masks():
    tr = stub_trainer(carried_masks_max=3)

    def mem(bank, extra=None):
        return StepMemory(labels={0: "bg", 1: "a"}, prototype_tap="x", prototypes=torch.zeros(2, 2),
                          prototype_counts=torch.zeros(2), label_bank=bank, extra=extra or {})

    tr.teacher_memory = mem([np.full((2, 2, 2), 1, np.uint8)] * 2,
                            {"inversion_label_bank": [np.full((2, 2, 2), 5, np.uint8)] * 2})
    new = mem([np.zeros((2, 2, 2), np.uint8)])
    tr.extend_step_memory(new)
    carried = new.extra["inversion_label_bank"]
    assert [int(m.max()) for m in carried] == [1, 1, 5]  # own bank first, capped at 3
    tr.teacher_memory = None
    other = mem([np.zeros((2, 2, 2), np.uint8)])
    tr.extend_step_memory(other)
    assert "inversion_label_bank" not in other.extra


def test_train_start_checks_patch_size_and_skips_synthesis_without_replay():
    from types import SimpleNamespace

    from nnunetv2_cimis.errors import CIMISError

    tr = stub_trainer(synthetic_ratio=0.0)
    logged = []
    tr.print_to_log_file = lambda *a: logged.append(" ".join(map(str, a)))
    tr.batch_size = 2
    tr.configuration_manager = SimpleNamespace(patch_size=[8, 8, 8])
    tr.teacher_memory = StepMemory(labels={0: "bg", 1: "a"}, prototype_tap="x", prototypes=torch.zeros(2, 2),
                                   prototype_counts=torch.zeros(2), patch_size=[8, 8, 8])
    tr.on_incremental_train_start()  # ratio 0: no teacher checkpoint needed, nothing synthesised
    assert getattr(tr, "synthetic_images", None) is None
    assert any("no synthesis" in line for line in logged)
    tr.teacher_memory.patch_size = [16, 16, 16]
    with pytest.raises(CIMISError, match="patch size"):
        tr.on_incremental_train_start()
    tr.teacher_memory = None
    with pytest.raises(CIMISError, match="step memory"):
        tr.on_incremental_train_start()


def test_hyperparameters_cover_the_method():
    hp = nnUNetTrainerMOSInv.default_hyperparameters
    assert hp["inversion_iterations"] == 2000 and hp["inversion_lr"] == 0.1
    assert hp["first_layer_weight"] == 10.0 and hp["tv_l1_weight"] == 2.5e-5 and hp["tv_l2_weight"] == 3e-8
    assert nnUNetTrainerMOSInv.needs_teacher_memory is True
    from nnunetv2_cimis.nnunet_trainers.mosinv import nnUNetTrainerMOSInv as reexported

    assert reexported is nnUNetTrainerMOSInv


# ------------------------------------------------------------------ end to end
E2E_HPARAMS = {"num_synthetic": 2, "inversion_iterations": 4, "inversion_batch_size": 2}


def _exe(name):
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def mosinv_run(tiny_scenario):
    """Steps 1 and 2 of the tiny phantom scenario trained with nnUNetTrainerMOSInv (2 iterations each)."""
    from e2e_utils import PLANS, model_folder, train

    env = dict(tiny_scenario["env"], nnUNet_cimis_hparams=json.dumps(E2E_HPARAMS))
    steps = tiny_scenario["step_datasets"]
    procs = [train(steps[1], "nnUNetTrainerMOSInv", env), train(steps[2], "nnUNetTrainerMOSInv", env)]
    return {"env": env, "steps": steps, "procs": procs, "plans": PLANS,
            "folders": [model_folder(env, steps[0], "nnUNetTrainerFT")]
            + [model_folder(env, s, "nnUNetTrainerMOSInv") for s in steps[1:]]}


def _log(folder):
    return "".join(open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.startswith("training_log"))


@pytest.mark.e2e
def test_e2e_step1_synthesises_and_replays(mosinv_run):
    from nnunetv2_cimis.synthesis.synthetic_sets import existing_volumes, load_synthetic_set, read_manifest

    teacher_fold, fold1, _ = mosinv_run["folders"]
    syn = os.path.join(fold1, "mosinv_synthetic")
    assert existing_volumes(syn) == [0, 1]
    images, labels = load_synthetic_set(syn)
    assert images.shape == (2, 1, 32, 32, 32) and labels.shape == (2, 32, 32, 32)
    assert labels.max() <= 2  # the step-0 teacher knows background + 2 classes
    manifest = read_manifest(syn)
    assert manifest["config"]["iterations"] == 4
    assert manifest["teacher_checkpoint"] == os.path.join(teacher_fold, "checkpoint_final.pth")
    with open(os.path.join(syn, "volume_0000.json")) as f:
        report = json.load(f)
    assert report["iterations"] == 4 and report["stats_distance"] >= 0
    log = _log(fold1)
    assert "MOSInversion: synthesising 2 volumes" in log and "1 per batch of 2 real" in log
    memory = StepMemory.load(os.path.join(fold1, "step_memory.pth"))
    carried = memory.extra["inversion_label_bank"]
    teacher_memory = StepMemory.load(os.path.join(teacher_fold, "step_memory.pth"))
    assert len(carried) == len(teacher_memory.label_bank) > 0
    assert set(np.unique(np.stack(carried))) <= {0, 1, 2}


@pytest.mark.e2e
def test_e2e_step2_uses_masks_of_every_earlier_step(mosinv_run):
    from nnunetv2_cimis.synthesis.synthetic_sets import read_manifest

    _, fold1, fold2 = mosinv_run["folders"]
    manifest = read_manifest(os.path.join(fold2, "mosinv_synthetic"))
    memory1 = StepMemory.load(os.path.join(fold1, "step_memory.pth"))
    # step 1's own patches (classes 3, 4) + the carried step-0 patches (classes 1, 2)
    assert manifest["num_masks"] == len(memory1.label_bank) + len(memory1.extra["inversion_label_bank"])
    assert manifest["teacher_checkpoint"] == os.path.join(fold1, "checkpoint_final.pth")
    assert "reusing" not in _log(fold2)


@pytest.mark.e2e
def test_e2e_cli_resumes_and_reports_errors(mosinv_run, tmp_path):
    env, steps = mosinv_run["env"], mosinv_run["steps"]
    teacher_fold = mosinv_run["folders"][0]
    out = str(tmp_path / "syn")
    cmd = [_exe("nnUNetv2_cimis_synthesize"), "-d", steps[0], "-c", "3d_fullres", "-tr", "nnUNetTrainerFT",
           "-p", mosinv_run["plans"], "-f", "0", "-n", "2", "--iterations", "3", "--no_progress", "-o", out,
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 volumes in" in proc.stdout and os.path.isfile(os.path.join(out, "summary.json"))
    first = os.stat(os.path.join(out, "volume_0000.npz")).st_mtime_ns
    more = list(cmd)
    more[more.index("-n") + 1] = "3"
    proc = subprocess.run(more, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.stat(os.path.join(out, "volume_0000.npz")).st_mtime_ns == first  # kept, not regenerated
    assert os.path.isfile(os.path.join(out, "volume_0002.json"))
    # other settings into the same folder: refused with a message, no traceback
    other = list(cmd)
    other[other.index("--iterations") + 1] = "5"
    proc = subprocess.run(other, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr
    # a missing model and a missing step memory are user errors (exit 2)
    proc = subprocess.run([_exe("nnUNetv2_cimis_synthesize"), "-m", str(tmp_path / "nope"), "-f", "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "No trained model" in proc.stderr
    fake = tmp_path / "model" / "fold_0"
    fake.mkdir(parents=True)
    (fake / "checkpoint_final.pth").write_bytes(open(os.path.join(teacher_fold, "checkpoint_final.pth"), "rb").read())
    proc = subprocess.run([_exe("nnUNetv2_cimis_synthesize"), "-m", str(fake.parent), "-f", "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "No step memory" in proc.stderr and "Traceback" not in proc.stderr

"""Tests of nnunetv2_cimis.losses.mib (UNCE, UNKD, unbiased Dice+CE) with hand-computed values."""
import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights
from nnunetv2_cimis.losses.dice import soft_dice_loss
from nnunetv2_cimis.losses.mib import UnbiasedCrossEntropy, UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation


def _np_softmax(v, axis=0):
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _unce_voxel(z, label, n_old):
    p = _np_softmax(np.asarray(z, dtype=np.float64))
    return -math.log(p[:n_old].sum()) if label < n_old else -math.log(p[label])


# ---------------------------------------------------------------- UNCE
def test_unce_one_voxel_each_case():
    z = [0.5, 1.0, -1.0, 2.0]  # bg, old 1, new 2, new 3; n_old = 2
    e = [math.exp(v) for v in z]
    for label, by_hand in ((0, -math.log((e[0] + e[1]) / sum(e))),
                           (1, -math.log((e[0] + e[1]) / sum(e))),  # an old label also reads as "bg or old"
                           (3, -math.log(e[3] / sum(e)))):
        loss = UnbiasedCrossEntropy(2)(torch.tensor(z).view(1, 4, 1, 1), torch.tensor([[[[label]]]]).float())
        assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_unce_batch_without_new_class_3d():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 2, 2, 2))
    target = np.zeros((2, 1, 2, 2, 2))
    exp = np.mean([_unce_voxel(z[b, :, i, j, k], 0, 3) for b in range(2) for i in range(2) for j in range(2)
                   for k in range(2)])
    assert UnbiasedCrossEntropy(3)(torch.tensor(z), torch.tensor(target)).item() == pytest.approx(exp, rel=1e-6)


def test_unce_single_new_class_and_label_map_without_channel():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1, 3, 3, 2))
    labels = np.array([[[0, 2], [2, 0], [1, 2]]])
    exp = np.mean([_unce_voxel(z[0, :, i, j], labels[0, i, j], 2) for i in range(3) for j in range(2)])
    loss = UnbiasedCrossEntropy(2)(torch.tensor(z), torch.tensor(labels))
    assert loss.item() == pytest.approx(exp, rel=1e-6)


def test_unce_ignore_index():
    z = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)  # voxel 0: (0,1,2), voxel 1: (3,0,0)
    target = torch.tensor([2, 9]).view(1, 1, 1, 2).float()
    loss = UnbiasedCrossEntropy(2, ignore_index=9)(z, target)
    assert loss.item() == pytest.approx(_unce_voxel([0.0, 1.0, 2.0], 2, 2), rel=1e-6)
    everything_ignored = UnbiasedCrossEntropy(2, ignore_index=9)(z, torch.full_like(target, 9))
    assert everything_ignored.item() == 0.0


def test_unce_bad_inputs():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            UnbiasedCrossEntropy(bad)
    with pytest.raises(ValueError, match="ignore_index"):
        UnbiasedCrossEntropy(2, ignore_index=1.5)
    with pytest.raises(ValueError, match="only 3 channels"):
        UnbiasedCrossEntropy(4)(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="labels must be in"):
        UnbiasedCrossEntropy(2)(torch.randn(1, 3, 2, 2), torch.full((1, 1, 2, 2), 3.0))
    with pytest.raises(ValueError, match="does not match"):
        UnbiasedCrossEntropy(2)(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 2, 3))


# ---------------------------------------------------------------- UNKD
def test_unkd_one_voxel_by_hand():
    # student (bg, old, new) = softmax(0, ln 2, 0) = (1/4, 1/2, 1/4) -> merged (bg+new, old) = (1/2, 1/2)
    # teacher softmax(ln 3, 0) = (3/4, 1/4); loss = -(3/4 ln 1/2 + 1/4 ln 1/2) / 2 = ln 2 / 2
    s = torch.tensor([0.0, math.log(2.0), 0.0]).view(1, 3, 1, 1)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    assert UnbiasedKnowledgeDistillation(2)(s, t).item() == pytest.approx(math.log(2.0) / 2, rel=1e-6)


def test_unkd_two_new_classes_3d_with_alpha():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(1, 5, 2, 1, 2))
    t = rng.normal(size=(1, 3, 2, 1, 2))
    vals = []
    for i in range(2):
        for k in range(2):
            p = _np_softmax(s[0, :, i, 0, k])
            merged = np.array([p[0] + p[3] + p[4], p[1], p[2]])
            q = _np_softmax(0.5 * t[0, :, i, 0, k])
            vals.append(-(q * np.log(merged)).sum() / 3)
    loss = UnbiasedKnowledgeDistillation(3, alpha=0.5)(torch.tensor(s), torch.tensor(t))
    assert loss.item() == pytest.approx(np.mean(vals), rel=1e-6)


def test_unkd_deep_supervision_scales():
    rng = np.random.default_rng(3)
    s = [torch.tensor(rng.normal(size=(1, 3, n, n))) for n in (4, 2, 1)]
    t = [torch.tensor(rng.normal(size=(1, 2, n, n))) for n in (4, 2, 1)]
    kd = UnbiasedKnowledgeDistillation(2)
    exp = 2 / 3 * kd(s[0], t[0]).item() + 1 / 3 * kd(s[1], t[1]).item()
    assert apply_over_scales(kd, deep_supervision_weights(3), s, t).item() == pytest.approx(exp, rel=1e-6)


def test_unkd_bad_inputs():
    with pytest.raises(ValueError, match="n_old=2"):
        UnbiasedKnowledgeDistillation(2)(torch.randn(1, 4, 2, 2), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="same batch"):
        UnbiasedKnowledgeDistillation(2)(torch.randn(1, 4, 2, 2), torch.randn(2, 2, 2, 2))
    with pytest.raises(ValueError):
        UnbiasedKnowledgeDistillation(2, alpha=0)


# ---------------------------------------------------------------- unbiased Dice + CE
def _dice_by_hand(probs, onehot, smooth=1e-5):
    """(K, N) probabilities and one-hot -> per-channel Dice."""
    return (2 * (probs * onehot).sum(1) + smooth) / (probs.sum(1) + onehot.sum(1) + smooth)


def test_unbiased_dice_ce_two_voxels_by_hand():
    z = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 2.0]])  # channels (bg, old, new) x 2 voxels
    labels = np.array([0, 2])
    p = _np_softmax(z, axis=0)
    merged = np.stack([p[0] + p[1], p[2]])
    onehot = np.array([[1.0, 0.0], [0.0, 1.0]])
    d = _dice_by_hand(merged, onehot)
    ce = np.mean([-np.log(merged[0, 0]), -np.log(merged[1, 1])])
    logits = torch.tensor(z).view(1, 3, 1, 2)
    target = torch.tensor(labels).view(1, 1, 1, 2).float()
    loss = UnbiasedDiceCELoss(2)(logits, target)
    assert loss.item() == pytest.approx(ce - d.mean(), rel=1e-6)
    loss_fg = UnbiasedDiceCELoss(2, include_background=False)(logits, target)
    assert loss_fg.item() == pytest.approx(ce - d[1], rel=1e-6)
    dice_only = UnbiasedDiceCELoss(2, weight_ce=0.0)(logits, target)
    assert dice_only.item() == pytest.approx(-d.mean(), rel=1e-6)


def test_unbiased_dice_does_not_tell_old_from_background():
    """Swapping background and old logits changes nothing: old classes get no Dice/CE of their own."""
    z = torch.randn(2, 4, 3, 3, 2)
    target = torch.randint(0, 2, (2, 1, 3, 3, 2)) * 3  # labels 0 and 3 (new); n_old = 3
    swapped = z[:, [1, 0, 2, 3]]
    loss = UnbiasedDiceCELoss(3)
    assert loss(z, target).item() == pytest.approx(loss(swapped, target).item(), rel=1e-6)
    # nnU-Net's plain Dice (with background) tells them apart: label 0 is matched with channel 0 only
    plain = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), batch_dice=False, do_bg=True,
                                        smooth=1e-5, ddp=False)
    assert plain(z, target).item() != pytest.approx(plain(swapped, target).item(), rel=1e-3)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_equals_nnunet_dice_on_given_probabilities(batch_dice, include_background):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 4, 3), 1)
    labels = torch.randint(0, 3, (2, 4, 4, 3))
    mask = torch.rand(2, 4, 4, 3) > 0.3
    ref = MemoryEfficientSoftDiceLoss(apply_nonlin=None, batch_dice=batch_dice, do_bg=include_background,
                                      smooth=1e-5, ddp=False)
    ours = soft_dice_loss(probs, labels, None, batch_dice, 1e-5, include_background)
    assert ours.item() == pytest.approx(ref(probs, labels[:, None]).item(), rel=1e-5)
    ours_m = soft_dice_loss(probs, labels, mask, batch_dice, 1e-5, include_background)
    ref_m = ref(probs, labels[:, None], loss_mask=mask[:, None].float())
    assert ours_m.item() == pytest.approx(ref_m.item(), rel=1e-5)


def test_unbiased_dice_ce_batch_without_new_voxels_and_deep_supervision():
    torch.manual_seed(1)
    zs = [torch.randn(2, 3, n, n, n, requires_grad=True) for n in (4, 2, 1)]
    ts = [torch.zeros(2, 1, n, n, n) for n in (4, 2, 1)]
    loss_fn = UnbiasedDiceCELoss(2, include_background=False)
    loss = apply_over_scales(loss_fn, deep_supervision_weights(3), zs, ts)
    # no new voxel: the new-class Dice is smooth / (sum p_new + smooth), CE = -log(p_bg + p_old)
    for z, t in zip(zs[:2], ts[:2]):
        p = torch.softmax(z.detach().double(), 1)
        exp_ce = -torch.log(p[:, 0] + p[:, 1]).mean().item()
        exp_dice = np.mean([1e-5 / (p[b, 2].sum().item() + 1e-5) for b in range(2)])
        assert loss_fn(z, t).item() == pytest.approx(exp_ce - exp_dice, rel=1e-5)
    assert torch.isfinite(loss)
    loss.backward()
    assert zs[2].grad is None  # weight 0: never evaluated


def test_unbiased_dice_ce_ignore_and_bad_args():
    z = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[0, 2], [5, 5]]).view(1, 1, 2, 2).float()
    loss = UnbiasedDiceCELoss(2, ignore_index=5)(z, target)
    assert torch.isfinite(loss)
    kept = UnbiasedDiceCELoss(2)(z[..., :1, :], target[..., :1, :])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-5)  # the ignored row contributes nothing
    with pytest.raises(ValueError):
        UnbiasedDiceCELoss(2, weight_dice=-1)
    with pytest.raises(ValueError, match="no new class"):
        UnbiasedDiceCELoss(3, include_background=False).dice(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))

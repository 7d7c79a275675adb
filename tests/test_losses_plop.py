"""Tests of nnunetv2_cimis.losses.plop (local POD, PLOP's distillation, pseudo-labels), values by hand/numpy."""
import itertools
import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_cimis.losses.deep_supervision import deep_supervision_weights
from nnunetv2_cimis.losses.plop import (LocalPOD, PLOPDistillationLoss, PLOPPseudoLabeller, PseudoLabelDiceCELoss,
                                        normalized_entropy, region_splits, sum_new_logits_into_background)


# ---------------------------------------------------------------- numpy reference of local POD (loops)
def _ref_embedding(x, counts_per_scale):
    """PLOP's _local_pod generalised to N-D with loops: per region, one mean profile per axis."""
    b = x.shape[0]
    nd = x.ndim - 2
    emb = []
    for counts in counts_per_scale:
        bounds = [[(k * x.shape[2 + d]) // counts[d] for k in range(counts[d] + 1)] for d in range(nd)]
        for idx in itertools.product(*[range(c) for c in counts]):
            region = x[(slice(None), slice(None)) + tuple(slice(bounds[d][i], bounds[d][i + 1])
                                                          for d, i in enumerate(idx))]
            for d in range(nd):
                other = tuple(2 + e for e in range(nd) if e != d)
                emb.append(region.mean(axis=other).reshape(b, -1))
    return np.concatenate(emb, axis=1)


def _ref_pod(s, t, counts_per_scale, square=True):
    if square:
        s, t = s ** 2, t ** 2
    d = _ref_embedding(s, counts_per_scale) - _ref_embedding(t, counts_per_scale)
    return np.sqrt((d ** 2).sum(1)).mean()


# ---------------------------------------------------------------- region_splits
def test_region_splits():
    assert region_splits((8, 8, 8), 4) == (4, 4, 4)
    assert region_splits((8, 32, 32), 4, extent=(8 * 3.0, 32 * 0.75, 32 * 0.75)) == (4, 4, 4)  # 24 x 24 x 24 mm
    assert region_splits((8, 32, 32), 4, extent=(8, 32, 32)) == (1, 4, 4)  # thin slab: 4 * 8/32 = 1
    assert region_splits((16, 32, 32), 4, extent=(16, 32, 32)) == (2, 4, 4)
    assert region_splits((2, 8), 4) == (2, 4)  # never more regions than voxels
    assert region_splits((4, 4, 4), (1, 2, 4)) == (1, 2, 4)
    assert region_splits((4, 4), 1, extent=(1, 100)) == (1, 1)  # never fewer than one
    with pytest.raises(ValueError):
        region_splits((4, 4), 0)
    with pytest.raises(ValueError, match="one extent per spatial axis"):
        region_splits((4, 4), 2, extent=(1, 1, 1))
    with pytest.raises(ValueError, match="integers"):
        region_splits((4, 4), (2, 2, 2))


# ---------------------------------------------------------------- LocalPOD
def test_local_pod_tiny_2d_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    t = torch.zeros(1, 1, 2, 2)
    # one region: row means (1.5, 3.5), column means (2, 3)
    loss = LocalPOD(scales=(1,), square=False)(s, t)
    assert loss.item() == pytest.approx(math.sqrt(1.5 ** 2 + 3.5 ** 2 + 2 ** 2 + 3 ** 2), rel=1e-6)
    # squared features: (1, 4; 9, 16): rows (2.5, 12.5), columns (5, 10)
    loss_sq = LocalPOD(scales=(1,))(s, t)
    assert loss_sq.item() == pytest.approx(math.sqrt(2.5 ** 2 + 12.5 ** 2 + 5 ** 2 + 10 ** 2), rel=1e-6)


def test_local_pod_tiny_3d_by_hand():
    s = torch.zeros(1, 1, 2, 2, 2)
    s[0, 0, 0, 0, 0] = 8.0
    t = torch.zeros_like(s)
    # scale 1, no squaring: every axis profile is (2, 0) (8 averaged over 4 voxels of the slice) -> 3 x 2^2
    assert LocalPOD(scales=(1,), square=False)(s, t).item() == pytest.approx(math.sqrt(12.0), rel=1e-6)
    # scale 2: 8 regions of one voxel; the one holding 8 has three profiles (8), others 0 -> sqrt(3 * 64)
    both = LocalPOD(scales=(1, 2), square=False)(s, t).item()
    assert both == pytest.approx(math.sqrt(12.0 + 3 * 64.0), rel=1e-6)


def test_local_pod_matches_plop_2d_loops():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, 8, 8))
    exp = _ref_pod(s, t, [(1, 1), (2, 2), (4, 4)])
    assert LocalPOD()(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(exp, rel=1e-6)


def test_local_pod_3d_anisotropic_non_divisible():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 2, 3, 7, 6)), rng.normal(size=(2, 2, 3, 7, 6))
    extent = (3 * 4.0, 7 * 1.0, 6 * 1.0)  # 12 x 7 x 6 mm: x is the longest physical axis
    counts = [region_splits((3, 7, 6), sc, extent) for sc in (1, 2, 4)]
    assert counts == [(1, 1, 1), (2, 1, 1), (3, 2, 2)]  # 4 * 7/12 = 2.33 -> 2; x clipped to 3 voxels
    exp = _ref_pod(s, t, counts)
    assert LocalPOD(extent=extent)(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(exp, rel=1e-6)


def test_local_pod_zero_for_identical_and_gradient_to_student_only():
    s = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    same = LocalPOD()(s, t)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    same.backward()  # the student starts as a copy of the teacher: the gradient must be finite (zero)
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
    s.grad = None
    LocalPOD()(s, t + 0.5).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_local_pod_bad_args():
    with pytest.raises(ValueError):
        LocalPOD(scales=())
    with pytest.raises(ValueError):
        LocalPOD(scales=(0,))
    with pytest.raises(ValueError):
        LocalPOD(scales=((1, 2, 3, 4),))
    with pytest.raises(ValueError):
        LocalPOD(extent=(1.0, -1.0))
    with pytest.raises(ValueError, match="same shape"):
        LocalPOD()(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4))


# ---------------------------------------------------------------- logits and the full distillation
def test_sum_new_logits_into_background():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1)
    out = sum_new_logits_into_background(z, 3)
    assert out.view(-1).tolist() == [1.0 + 4.0 + 5.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        sum_new_logits_into_background(z, 6)


def test_plop_distillation_combines_maps_as_plop():
    rng = np.random.default_rng(2)
    f_s = [rng.normal(size=(1, 2, 4, 4, 4)), rng.normal(size=(1, 3, 2, 2, 2))]
    f_t = [rng.normal(size=x.shape) for x in f_s]
    z_s = [rng.normal(size=(1, 4, 4, 4, 4)), rng.normal(size=(1, 4, 2, 2, 2)), rng.normal(size=(1, 4, 1, 1, 1))]
    z_t = [rng.normal(size=(1, 3, *x.shape[2:])) for x in z_s]

    def counts(shape):
        return [tuple(min(s, n) for n in shape) for s in (1, 2, 4)]

    feat = sum(0.01 * _ref_pod(a, b, counts(a.shape[2:])) for a, b in zip(f_s, f_t))
    merged = [np.concatenate([z[:, :1] + z[:, 3:].sum(1, keepdims=True), z[:, 1:3]], 1) for z in z_s]
    logit = 0.0005 * (2 / 3 * _ref_pod(merged[0], z_t[0], counts((4, 4, 4)))
                      + 1 / 3 * _ref_pod(merged[1], z_t[1], counts((2, 2, 2))))
    exp = math.sqrt(4 / 1) * (feat + logit) / 3  # n_total = 4 channels, one new class, 2 maps + logits
    loss = PLOPDistillationLoss(n_old=3, n_total=4)([torch.tensor(x) for x in f_s], [torch.tensor(x) for x in f_t],
                                                    [torch.tensor(x) for x in z_s], [torch.tensor(x) for x in z_t],
                                                    scale_weights=deep_supervision_weights(3))
    assert loss.item() == pytest.approx(exp, rel=1e-6)
    no_logits = PLOPDistillationLoss(3, 4, class_schedule=False)([torch.tensor(x) for x in f_s],
                                                                 [torch.tensor(x) for x in f_t])
    assert no_logits.item() == pytest.approx(feat / 2, rel=1e-6)
    only_second = PLOPDistillationLoss(3, 4)([torch.tensor(x) for x in f_s], [torch.tensor(x) for x in f_t],
                                             [torch.tensor(x) for x in z_s], [torch.tensor(x) for x in z_t],
                                             scale_weights=[0.0, 1.0, 0.0])  # the weights given are the ones used
    exp_second = math.sqrt(4 / 1) * (feat + 0.0005 * _ref_pod(merged[1], z_t[1], counts((2, 2, 2)))) / 3
    assert only_second.item() == pytest.approx(exp_second, rel=1e-6)


def test_plop_distillation_bad_args():
    with pytest.raises(ValueError):
        PLOPDistillationLoss(3, 3)
    with pytest.raises(ValueError):
        PLOPDistillationLoss(2, 3, feature_weight=-1)
    loss = PLOPDistillationLoss(2, 3)
    with pytest.raises(ValueError, match="both"):
        loss([torch.randn(1, 2, 2, 2)], [torch.randn(1, 2, 2, 2)], [torch.randn(1, 3, 2, 2)], None)
    with pytest.raises(ValueError, match="nothing"):
        loss([], [])
    with pytest.raises(ValueError, match="channels"):
        loss([], [], [torch.randn(1, 4, 2, 2)], [torch.randn(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="scale_weights"):  # several scales: nnU-Net's weights must be given
        loss([], [], [torch.randn(1, 3, 2, 2)] * 2, [torch.randn(1, 2, 2, 2)] * 2)


# ---------------------------------------------------------------- entropy and pseudo-labels
def test_normalized_entropy():
    z = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [math.log(2.0), 0.0, -1e9]]).T.reshape(1, 3, 1, 3)
    h = normalized_entropy(z).view(-1)
    assert h[0].item() == pytest.approx(1.0, rel=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    p = np.array([2 / 3, 1 / 3])
    assert h[2].item() == pytest.approx(-(p * np.log(p)).sum() / math.log(3), rel=1e-5)
    assert normalized_entropy(torch.randn(2, 1, 3, 3)).abs().sum() == 0


def _teacher(values):
    """(1, 2, 1, N) teacher logits from a list of (bg, old) pairs."""
    return torch.tensor(values, dtype=torch.float32).T.reshape(1, 2, 1, -1)


def _entropy2(a, b):
    p = np.exp([a, b]) / np.exp([a, b]).sum()
    return -(p * np.log(p)).sum() / math.log(2)


def test_thresholds_are_per_class_medians_with_floor():
    # class 0 (bg argmax): entropies of (2,0) x3 and (1,0) x1; class 1: never predicted
    pl = PLOPPseudoLabeller(n_old=2, num_bins=100, threshold_floor=0.001)
    pl.accumulate(_teacher([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), torch.zeros(1, 1, 1, 4))
    pl.accumulate(_teacher([[0.0, 5.0]]), torch.full((1, 1, 1, 1), 3.0))  # a new-class voxel: not counted
    thr = pl.compute_thresholds()
    e2, e1 = _entropy2(2.0, 0.0), _entropy2(1.0, 0.0)
    k2, k1 = int(e2 * 100), int(e1 * 100)
    assert k1 > k2
    # 4 values, half = 2: bin k2 holds 3 of them -> median = (k2 + 2/3) / 100
    assert thr[0].item() == pytest.approx((k2 + 2 / 3) / 100, rel=1e-6)
    assert thr[1].item() == pytest.approx(0.001)
    assert pl.histogram.sum().item() == 4


def test_single_value_class_median_and_floor():
    pl = PLOPPseudoLabeller(n_old=2, num_bins=10, threshold_floor=0.3)
    pl.accumulate(_teacher([[0.0, 30.0]]), torch.zeros(1, 1, 1, 1))  # confident old class: entropy ~ 0
    thr = pl.compute_thresholds()
    assert thr[1].item() == pytest.approx(0.3)  # median 0.05 raised to the floor


def test_pseudo_labels_and_image_weights():
    pl = PLOPPseudoLabeller(n_old=2, num_bins=100, threshold_floor=0.0)
    with pytest.raises(RuntimeError, match="thresholds"):
        pl(_teacher([[1.0, 0.0]]), torch.zeros(1, 1, 1, 1))
    pl.thresholds.copy_(torch.tensor([0.5, 0.5]))
    pl.ready.fill_(True)
    # voxels: confident bg, uncertain, confident old, new class 2 -> labels 0, 0, 0, 2
    t = _teacher([[5.0, 0.0], [0.1, 0.0], [0.0, 5.0], [5.0, 0.0]])
    target = torch.tensor([0, 0, 0, 2]).view(1, 1, 1, 4).float()
    pseudo, w = pl(t, target)
    assert pseudo.view(-1).tolist() == [0, -100, 1, 2]
    assert w.tolist() == pytest.approx([2 / 3])
    # an image with no label-0 voxel gets weight 1; a batch with no new class is fully pseudo-labelled
    _, w_new = pl(_teacher([[5.0, 0.0]]), torch.full((1, 1, 1, 1), 2.0))
    assert w_new.tolist() == [1.0]
    pseudo_bg, w_bg = pl(_teacher([[5.0, 0.0], [0.0, 5.0]]), torch.zeros(1, 1, 1, 2))
    assert pseudo_bg.view(-1).tolist() == [0, 1] and w_bg.tolist() == [1.0]


def test_pseudo_labeller_3d_and_state_dict_round_trip():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 4, 4) * 3
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, :2] = 3
    pl = PLOPPseudoLabeller(3)
    pl.accumulate(t, target)
    pl.compute_thresholds()
    restored = PLOPPseudoLabeller(3)
    restored.load_state_dict(pl.state_dict())
    assert restored.has_thresholds
    assert torch.equal(restored.thresholds, pl.thresholds)
    a, wa = pl(t, target)
    b, wb = restored(t, target)
    assert torch.equal(a, b) and torch.equal(wa, wb)
    assert (a[:, :2] == 3).all()  # new-class voxels keep their label


def test_pseudo_labeller_bad_args():
    for kwargs in ({"n_old": 0}, {"n_old": 2, "num_bins": 0}, {"n_old": 2, "threshold_floor": 2.0},
                   {"n_old": 2, "ignore_index": 1}, {"n_old": 2, "min_image_weight": -0.1}):
        with pytest.raises(ValueError):
            PLOPPseudoLabeller(**kwargs)
    with pytest.raises(ValueError, match="n_old=2"):
        PLOPPseudoLabeller(2).accumulate(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- pseudo-labelled Dice + CE
def test_pseudo_label_ce_weighted_mean_over_all_voxels():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]).T  # (C=3, N=2)
    logits = torch.tensor(z).view(1, 3, 1, 2)
    pseudo = torch.tensor([1, -100]).view(1, 1, 2)
    loss = PseudoLabelDiceCELoss(weight_dice=0.0)(logits, pseudo, torch.tensor([0.5]))
    p = np.exp(z[:, 0]) / np.exp(z[:, 0]).sum()
    assert loss.item() == pytest.approx(0.5 * -np.log(p[1]) / 2, rel=1e-6)  # ignored voxel counts as 0


def test_pseudo_label_dice_matches_nnunet_masked_dice():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 2)
    labels = torch.randint(0, 3, (2, 4, 4, 2))
    labels[0, 0] = -100
    loss = PseudoLabelDiceCELoss(weight_ce=0.0, batch_dice=True)(logits, labels)
    mask = (labels != -100)
    ref = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), batch_dice=True, do_bg=False,
                                      smooth=1e-5, ddp=False)
    exp = ref(logits, torch.where(mask, labels, 0)[:, None], loss_mask=mask[:, None].float())
    assert loss.item() == pytest.approx(exp.item(), rel=1e-5)


def test_pseudo_label_loss_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        PseudoLabelDiceCELoss()(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 5))
    with pytest.raises(ValueError, match="image_weights"):
        PseudoLabelDiceCELoss()(torch.randn(2, 3, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long), torch.ones(3))

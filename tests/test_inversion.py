"""Tests of nnunetv2_cimis.synthesis (MOSInversion's mask-conditioned DeepInversion, priors, masks, sets)."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.networks.norm_statistics import (NormInputRecorder, channel_statistics, norm_layer_names,
                                                     pool_statistics)
from nnunetv2_cimis.synthesis.inversion import InversionConfig, hard_dice_per_class, invert
from nnunetv2_cimis.synthesis.inversion import mask_dice_loss as soft_dice_loss
from nnunetv2_cimis.synthesis.mask_augmentation import MaskAugmentation, conditioning_masks, sanitize_mask
from nnunetv2_cimis.synthesis.priors import FeatureStatisticsLoss, TotalVariationPrior, neighbour_offsets
from nnunetv2_cimis.synthesis.synthetic_sets import (existing_volumes, load_synthetic_set, synthesis_settings,
                                                     synthesize_set, usable_set, volume_name)


def tiny_net(out_channels=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(),
                         nn.Conv3d(4, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True), nn.LeakyReLU(),
                         nn.Conv3d(6, out_channels, 1))


def cube_masks(b=2, n=12):
    m = torch.zeros(b, n, n, n, dtype=torch.long)
    m[:, 2:7, 2:7, 2:7] = 1
    m[:, 7:11, 6:10, 3:8] = 2
    return m


def make_memory(norm_stats, bank, labels=None):
    labels = labels or {0: "background", 1: "a", 2: "b"}
    n = max(labels) + 1
    return StepMemory(labels=labels, prototype_tap="x", prototypes=torch.zeros(n, 2),
                      prototype_counts=torch.zeros(n), norm_stats=norm_stats, label_bank=bank,
                      patch_size=list(bank[0].shape) if bank else [])


# ------------------------------------------------------------------ statistics
def test_channel_and_pooled_statistics_match_numpy():
    x = torch.randn(3, 2, 4, 5, 3)
    mean, var = channel_statistics(x)
    a = x.numpy()
    np.testing.assert_allclose(mean.numpy(), a.reshape(3, 2, -1).mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), a.reshape(3, 2, -1).var(-1), rtol=1e-5, atol=1e-6)
    pm, pv = pool_statistics(mean, var)
    all_vox = a.transpose(1, 0, 2, 3, 4).reshape(2, -1)
    np.testing.assert_allclose(pm.numpy(), all_vox.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pv.numpy(), all_vox.var(1), rtol=1e-4, atol=1e-6)


def test_feature_statistics_loss_hand_computed():
    target = {"a": {"mean": torch.tensor([0.0, 0.0]), "var": torch.tensor([1.0, 1.0])},
              "b": {"mean": torch.tensor([0.0]), "var": torch.tensor([0.0])}}
    batch = {"a": (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])),
             "b": (torch.tensor([3.0]), torch.tensor([4.0]))}
    # r_a = (sqrt(1 + 4) + 0) / 2 channels, r_b = (3 + 4) / 1; first layer x10; mean over 2 layers
    expected = (10 * math.sqrt(5) / 2 + 7.0) / 2
    loss = FeatureStatisticsLoss(target)(batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # order decides which layer is "first"
    loss_b_first = FeatureStatisticsLoss(target, layer_order=["b", "a"])(batch)
    assert loss_b_first.item() == pytest.approx((10 * 7.0 + math.sqrt(5) / 2) / 2, rel=1e-6)
    # first-layer weight 1: plain mean
    assert FeatureStatisticsLoss(target, first_layer_weight=1.0)(batch).item() == pytest.approx(
        (math.sqrt(5) / 2 + 7.0) / 2, rel=1e-6)


def test_feature_statistics_loss_pools_per_sample_statistics():
    x = torch.randn(2, 3, 4, 4, 4) * 2 + 1
    target = {"l": {"mean": torch.zeros(3), "var": torch.ones(3)}}
    all_vox = x.numpy().transpose(1, 0, 2, 3, 4).reshape(3, -1)
    expected = 10 * (np.linalg.norm(all_vox.mean(1)) + np.linalg.norm(all_vox.var(1) - 1)) / 3
    loss = FeatureStatisticsLoss(target)({"l": channel_statistics(x)})
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_feature_statistics_loss_errors():
    good = {"a": {"mean": torch.zeros(2), "var": torch.ones(2)}}
    with pytest.raises(ValueError, match="empty"):
        FeatureStatisticsLoss({})
    with pytest.raises(ValueError, match="no stored statistics"):
        FeatureStatisticsLoss(good, layer_order=["zzz"])
    with pytest.raises(ValueError, match="mean"):
        FeatureStatisticsLoss({"a": {"mean": torch.zeros(2)}})
    with pytest.raises(ValueError, match=r"\(C,\)"):
        FeatureStatisticsLoss({"a": {"mean": torch.zeros(2), "var": torch.ones(3)}})
    with pytest.raises(ValueError, match="first_layer_weight"):
        FeatureStatisticsLoss(good, first_layer_weight=-1)
    loss = FeatureStatisticsLoss(good)
    with pytest.raises(ValueError, match="no statistics recorded"):
        loss({})
    with pytest.raises(ValueError, match="channels"):
        loss({"a": (torch.zeros(3), torch.ones(3))})


def test_norm_input_recorder_records_input_of_norm_layers():
    net = tiny_net()
    names = norm_layer_names(net)
    assert names == ["1", "4"]
    x = torch.randn(2, 1, 6, 6, 6)
    with NormInputRecorder(net) as rec:
        net(x)
        conv_out = net[0](x).detach().numpy()
        m, v = rec.stats["1"]
        assert m.shape == (2, 4) and rec.stats["4"][0].shape == (2, 6)
        np.testing.assert_allclose(m.detach().numpy(), conv_out.reshape(2, 4, -1).mean(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v.detach().numpy(), conv_out.reshape(2, 4, -1).var(-1), rtol=1e-4, atol=1e-6)
    rec.stats.clear()
    net(x)  # hooks removed on exit
    assert rec.stats == {}
    with pytest.raises(ValueError, match="not in the network"):
        NormInputRecorder(net, ["decoder.nothing"])


# ------------------------------------------------------------------ total variation
def test_neighbour_offsets():
    for nd, count in ((3, 13), (2, 4)):
        offs = neighbour_offsets(nd)
        assert len(offs) == count == len(set(offs))
        for o in offs:
            assert tuple(-v for v in o) not in offs
    with pytest.raises(ValueError):
        neighbour_offsets(1)


def test_total_variation_2d_hand_computed():
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]])[None, None]
    # directions: along Y -> [1, 2]; along X -> [2, 3]; diagonal -> [4]; anti-diagonal -> [2 - 1 = 1]
    l1, l2 = TotalVariationPrior().terms(x)
    assert l1.item() == pytest.approx(1.5 + 2.5 + 4 + 1)
    assert l2.item() == pytest.approx(math.sqrt(5) + math.sqrt(13) + 4 + 1, rel=1e-6)
    tv = TotalVariationPrior(l1_weight=2.0, l2_weight=0.5)(x)
    assert tv.item() == pytest.approx(2 * 9 + 0.5 * (math.sqrt(5) + math.sqrt(13) + 5), rel=1e-6)


def test_total_variation_3d_ramp_and_constant():
    ramp = torch.arange(4.0)[:, None, None].expand(4, 3, 5)[None, None].clone()
    l1, l2 = TotalVariationPrior().terms(ramp)
    # 9 of the 13 directions step along X (|difference| 1 everywhere), 4 do not (difference 0)
    assert l1.item() == pytest.approx(9.0)
    expected_l2 = 0.0
    for o in neighbour_offsets(3):
        if o[0] == 0:
            continue
        count = 3 * (3 - abs(o[1])) * (5 - abs(o[2]))
        expected_l2 += math.sqrt(count)
    assert l2.item() == pytest.approx(expected_l2, rel=1e-6)
    const = torch.full((2, 1, 3, 3, 3), 7.0)
    assert TotalVariationPrior()(const).item() == 0.0


def test_total_variation_3d_matches_all_26_neighbours():
    x = torch.randn(1, 2, 4, 3, 5)
    a = x.numpy()
    l1_26, l2_26 = 0.0, 0.0
    for o in itertools.product((-1, 0, 1), repeat=3):
        if o == (0, 0, 0):
            continue
        src = tuple(slice(max(-v, 0), a.shape[2 + k] - max(v, 0)) for k, v in enumerate(o))
        dst = tuple(slice(max(v, 0), a.shape[2 + k] - max(-v, 0)) for k, v in enumerate(o))
        d = a[(slice(None), slice(None)) + dst] - a[(slice(None), slice(None)) + src]
        l1_26 += np.abs(d).mean()
        l2_26 += np.sqrt((d ** 2).sum())
    l1, l2 = TotalVariationPrior().terms(x)
    assert l1.item() == pytest.approx(l1_26 / 2, rel=1e-5)  # every direction counted twice over 26
    assert l2.item() == pytest.approx(l2_26 / 2, rel=1e-5)


def test_total_variation_errors():
    with pytest.raises(ValueError):
        TotalVariationPrior(l1_weight=-1)
    with pytest.raises(ValueError, match="spatial sizes"):
        TotalVariationPrior()(torch.zeros(1, 1, 1, 4, 4))
    with pytest.raises(ValueError):
        TotalVariationPrior()(torch.zeros(4, 4))


# ------------------------------------------------------------------ Dice
def test_soft_dice_loss_hand_computed():
    mask = torch.tensor([[0, 1, 1, 0]])[:, :, None]  # (1, 4, 1)
    probs = torch.tensor([[[0.5, 0.0, 1.0, 1.0], [0.5, 1.0, 0.0, 0.0], [0, 0, 0, 0]]])[..., None]  # (1, 3, 4, 1)
    # class 0: inter 0.5 + 1 = 1.5, sums 2.5 + 2 -> 3/4.5 ; class 1: inter 1, sums 1.5 + 2 -> 2/3.5; class 2 absent
    expected = 1 - (3 / 4.5 + 2 / 3.5) / 2
    assert soft_dice_loss(probs, mask, smooth=0.0).item() == pytest.approx(expected, rel=1e-6)
    perfect = torch.nn.functional.one_hot(mask, 3).movedim(-1, 1).float()
    assert soft_dice_loss(perfect, mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="values"):
        soft_dice_loss(probs, mask + 5)
    with pytest.raises(ValueError, match="matching"):
        soft_dice_loss(probs, mask[:, :2])


def test_hard_dice_per_class():
    pred = torch.tensor([0, 1, 1, 2, 0])
    ref = torch.tensor([0, 1, 0, 0, 3])
    d = hard_dice_per_class(pred, ref)
    assert d == {1: pytest.approx(2 / 3), 2: 0.0, 3: 0.0}
    assert hard_dice_per_class(torch.zeros(3), torch.zeros(3)) == {}


# ------------------------------------------------------------------ masks
def test_mask_augmentation():
    m = cube_masks(1)[0].numpy().astype(np.uint8)
    same = MaskAugmentation(p_flip=0, p_elastic=0, p_rotation=0, p_scale=0)(m, np.random.default_rng(0))
    np.testing.assert_array_equal(same, m)
    flipped = MaskAugmentation(p_flip=1, p_elastic=0, p_rotation=0, p_scale=0)(m, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, m[::-1, ::-1, ::-1])
    aug = MaskAugmentation(p_elastic=1, p_rotation=1, p_scale=1)
    a1 = aug(m, np.random.default_rng(3))
    a2 = aug(m, np.random.default_rng(3))
    np.testing.assert_array_equal(a1, a2)  # reproducible from the generator
    assert a1.shape == m.shape and a1.dtype == np.uint8
    assert set(np.unique(a1)) <= {0, 1, 2} and (a1 != m).any()
    assert aug(m[None], np.random.default_rng(3)).shape == m.shape  # (1, X, Y, Z) accepted
    with pytest.raises(ValueError):
        MaskAugmentation(p_flip=2)
    with pytest.raises(ValueError):
        aug(np.zeros(5), np.random.default_rng(0))


def test_sanitize_and_conditioning_masks():
    np.testing.assert_array_equal(sanitize_mask(np.array([0, 1, 2, 255]), 3), [0, 1, 2, 0])
    bank = [np.zeros((4, 4, 4), np.uint8)]
    mem = make_memory({}, bank)
    assert len(conditioning_masks(mem)) == 1
    mem.extra["inversion_label_bank"] = [np.ones((4, 4, 4), np.uint8)] * 2
    assert len(conditioning_masks(mem)) == 3


# ------------------------------------------------------------------ inversion
def _target_stats(net, shift=1.5):
    """Statistics of the network's norm inputs on a 'real' image distribution (a shifted, smooth volume)."""
    x = torch.randn(4, 1, 12, 12, 12) * 0.5 + shift
    with NormInputRecorder(net) as rec, torch.no_grad():
        net(x)
        return {n: dict(zip(("mean", "var"), pool_statistics(*rec.stats[n]))) for n in rec.names}


def test_invert_lowers_loss_and_moves_statistics():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    target = _target_stats(net)
    cfg = InversionConfig(iterations=25, lr=0.1)
    res = invert(net, cube_masks(2), target, 1, cfg, generator=torch.Generator().manual_seed(0))
    assert res.images.shape == (2, 1, 12, 12, 12) and res.labels.shape == (2, 12, 12, 12)
    assert res.labels.dtype == torch.uint8
    assert len(res.losses) == 25
    assert np.mean(res.losses[-3:]) < 0.8 * res.losses[0]
    for r in res.reports:
        assert r["stats_distance"] < 0.7 * r["stats_distance_start"]
        assert set(r) >= {"dice", "mean_dice", "stats_distance", "final_loss", "iterations"}
    # the network is untouched: same weights, no gradients, mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())
    assert net.training


def test_invert_stats_only_reaches_targets_better_than_dice_only():
    net = tiny_net()
    target = _target_stats(net, shift=2.0)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with_stats = invert(net, cube_masks(1), target, 1, InversionConfig(iterations=20, dice_weight=0.0), generator=g())
    without = invert(net, cube_masks(1), target, 1, InversionConfig(iterations=20, stats_weight=0.0), generator=g())
    assert with_stats.reports[0]["stats_distance"] < without.reports[0]["stats_distance"]


def test_invert_zero_iterations_and_errors():
    net = tiny_net()
    target = _target_stats(net)
    res = invert(net, cube_masks(1), target, 1, InversionConfig(iterations=0))
    assert res.losses == [] and res.reports[0]["stats_distance"] == res.reports[0]["stats_distance_start"]
    with pytest.raises(ValueError, match="masks"):
        invert(net, torch.zeros(12, 12, dtype=torch.long), target, 1)
    with pytest.raises(ValueError, match="init"):
        invert(net, cube_masks(1), target, 1, init=torch.zeros(1, 2, 12, 12, 12))
    with pytest.raises(ValueError, match="not in the network"):
        invert(net, cube_masks(1), {"nope": target["1"]}, 1)
    with pytest.raises(ValueError, match="values"):
        invert(net, cube_masks(1) * 5, target, 1, InversionConfig(iterations=1))
    for bad in ({"iterations": -1}, {"lr": 0}, {"lr_schedule": "cosine"}, {"tv_l1_weight": -1}):
        with pytest.raises(ValueError):
            InversionConfig(**bad)


def test_synthesize_set_resumable_and_reports(tmp_path):
    net = tiny_net()
    target = _target_stats(net)
    bank = [m.numpy().astype(np.uint8) for m in cube_masks(2, 8)]
    mem = make_memory(target, bank)
    cfg = InversionConfig(iterations=3)
    out = str(tmp_path / "syn")
    quiet = dict(show_progress=False, manifest_extra={"teacher_fingerprint": "abc"})
    assert synthesize_set(net, mem, 1, out, 4, cfg, batch_size=2, **quiet) == [0, 1, 2, 3]
    assert existing_volumes(out) == [0, 1, 2, 3]
    images, labels = load_synthetic_set(out)
    assert images.shape == (4, 1, 8, 8, 8) and labels.shape == (4, 8, 8, 8) and labels.dtype == np.uint8
    with open(os.path.join(out, volume_name(1) + ".json")) as f:
        rep = json.load(f)
    assert rep["index"] == 1 and rep["batch"] == [0, 1] and "mean_dice" in rep and "stats_distance" in rep
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["num_volumes"] == 4
    # resume: deleted volumes are regenerated identically, the others are kept untouched
    kept = os.path.join(out, volume_name(0) + ".npz")
    mtime = os.stat(kept).st_mtime_ns
    with np.load(os.path.join(out, volume_name(2) + ".npz")) as d:
        img2 = d["image"].copy()
    for i in (2, 3):
        os.remove(os.path.join(out, volume_name(i) + ".npz"))
    assert existing_volumes(out) == [0, 1]
    synthesize_set(net, mem, 1, out, 5, cfg, batch_size=2, **quiet)
    assert existing_volumes(out) == [0, 1, 2, 3, 4]
    assert os.stat(kept).st_mtime_ns == mtime
    with np.load(os.path.join(out, volume_name(2) + ".npz")) as d:
        np.testing.assert_allclose(d["image"], img2, atol=1e-5)  # same mask, same start, same batch (2, 3)
    # another teacher or other settings: refused
    with pytest.raises(ValueError, match="other settings"):
        synthesize_set(net, mem, 1, out, 4, cfg, show_progress=False, manifest_extra={"teacher_fingerprint": "x"})
    with pytest.raises(ValueError, match="other settings"):
        synthesize_set(net, mem, 1, out, 4, InversionConfig(iterations=4), **quiet)
    # the reuse key: teacher fingerprint, enough volumes, and (when given) the same synthesis settings
    same = synthesis_settings(cfg, MaskAugmentation(), 0, 2)
    assert usable_set(out, "abc", 5, same) and usable_set(out, "abc", 5)
    assert not usable_set(out, "abc", 6, same) and not usable_set(out, "x", 1)
    assert not usable_set(out, "abc", 1, synthesis_settings(InversionConfig(iterations=50), MaskAugmentation(), 0, 2))
    assert not usable_set(out, "abc", 1, synthesis_settings(cfg, MaskAugmentation(p_flip=0), 0, 2))
    assert not usable_set(out, "abc", 1, synthesis_settings(cfg, MaskAugmentation(), 1, 2))
    assert not usable_set(out, "abc", 1, synthesis_settings(cfg, MaskAugmentation(), 0, 1))


def test_synthesize_set_warns_when_stats_weight_is_zero(tmp_path):
    net = tiny_net()
    mem = make_memory(_target_stats(net), [m.numpy().astype(np.uint8) for m in cube_masks(1, 8)])
    logged = []
    with pytest.warns(UserWarning, match="stats_weight is 0"):
        synthesize_set(net, mem, 1, str(tmp_path / "s"), 1, InversionConfig(iterations=1, stats_weight=0.0),
                       show_progress=False, log=logged.append)
    assert any("stats_weight is 0" in line for line in logged)


def test_synthesize_set_needs_statistics_and_masks(tmp_path):
    net = tiny_net()
    with pytest.raises(ValueError, match="statistics"):
        synthesize_set(net, make_memory({}, [np.zeros((4, 4, 4), np.uint8)]), 1, str(tmp_path), 1)
    with pytest.raises(ValueError, match="label bank"):
        synthesize_set(net, make_memory(_target_stats(net), []), 1, str(tmp_path), 1)
    mixed = make_memory(_target_stats(net), [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 6), np.uint8)])
    with pytest.raises(ValueError, match="different shapes"):
        synthesize_set(net, mixed, 1, str(tmp_path), 1)


def test_inversion_of_a_trained_teacher_recovers_the_organs():
    """A teacher trained on spheres (intensity = label value + noise) is inverted from noise: the synthetic
    volumes must be segmented as their masks and carry the real intensities (the information in the
    statistics and the teacher), which only works if the losses drive the image the right way."""
    torch.manual_seed(0)
    n = 12
    grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij")).float()

    def sample(b):
        labels = torch.zeros(b, n, n, n, dtype=torch.long)
        for i in range(b):
            for c, r in ((1, 3), (2, 2)):
                centre = torch.randint(r + 1, n - r - 1, (3,)).float()
                labels[i][((grid - centre[:, None, None, None]) ** 2).sum(0) <= r * r] = c
        return (labels.float() + 0.3 * torch.randn(labels.shape))[:, None], labels

    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(80):
        x, y = sample(2)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with NormInputRecorder(net) as rec, torch.no_grad():
        x, y = sample(8)
        net(x)
        stats = {k: dict(zip(("mean", "var"), pool_statistics(*rec.stats[k]))) for k in rec.names}
    _, masks = sample(2)
    start = invert(net, masks, stats, 1, InversionConfig(iterations=0), generator=torch.Generator().manual_seed(0))
    res = invert(net, masks, stats, 1, InversionConfig(iterations=120), generator=torch.Generator().manual_seed(0))
    assert np.mean([r["mean_dice"] for r in start.reports]) < 0.3  # noise: the teacher sees no organ
    assert np.mean([r["mean_dice"] for r in res.reports]) > 0.7  # measured 0.83 (small class harder)
    img = res.images[:, 0]
    means = [float(img[masks == c].mean()) for c in range(3)]  # real data: 0, 1, 2
    assert abs(means[0]) < 0.3 and 0.6 < means[1] < 1.4 and means[2] > means[1] + 0.2, means

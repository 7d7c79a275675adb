"""Unit tests of IAPL: network parts (nnunetv2_cimis.networks.iapl), loss (nnunetv2_cimis.losses.iapl) and
the trainer's static network builder. Expected values are computed by hand or with numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.dice import soft_dice_loss
from nnunetv2_cimis.losses.iapl import IAPLLoss
from nnunetv2_cimis.networks.iapl import (DynamicClassHeads, IAPLNetwork, KMeansTransformerLayer, cluster_purity,
                                          confidence_weighted_pooling, confidence_weights, kmeans_update,
                                          purity_threshold)

ARCH = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def arch_kwargs(dim: int, n_stages: int = 3, features=(4, 8, 16)):
    return dict(n_stages=n_stages, features_per_stage=list(features[:n_stages]),
                conv_op=f"torch.nn.modules.conv.Conv{dim}d", kernel_sizes=[[3] * dim] * n_stages,
                strides=[[1] * dim] + [[2] * dim] * (n_stages - 1), n_conv_per_stage=[1] * n_stages,
                n_conv_per_stage_decoder=[1] * (n_stages - 1), conv_bias=True,
                norm_op=f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})


def tiny_unet(dim: int, num_classes: int = 3, deep_supervision: bool = True, n_stages: int = 3):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(ARCH, arch_kwargs(dim, n_stages), ["conv_op", "norm_op", "dropout_op", "nonlin"],
                                  1, num_classes, deep_supervision=deep_supervision)


def tiny_iapl(dim: int, num_classes: int = 3, deep_supervision: bool = True, **kw):
    torch.manual_seed(0)
    defaults = dict(num_queries=6, embed_dim=8, num_heads=2, prototype_embedding_dim=8)
    defaults.update(kw)
    return IAPLNetwork(tiny_unet(dim, num_classes, deep_supervision), num_classes, **defaults)


# ----------------------------------------------------------------------------------------- pure functions
def test_cluster_purity_hand_computed():
    assignment = torch.tensor([[0, 0, 0, 1, 1, 2]])
    predicted = torch.tensor([[1, 1, 2, 0, 0, 2]])
    purity = cluster_purity(assignment, predicted, num_queries=4, num_classes=3)
    # cluster 0: 2 of 3 voxels class 1; cluster 1: only background -> 0; cluster 2: pure class 2; 3: empty
    assert torch.allclose(purity, torch.tensor([[2 / 3, 0.0, 1.0, 0.0]]))


def test_cluster_purity_per_image():
    assignment = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    predicted = torch.tensor([[1, 2, 1, 1], [0, 0, 2, 0]])
    purity = cluster_purity(assignment, predicted, 2, 3)
    assert torch.allclose(purity, torch.tensor([[0.5, 1.0], [0.0, 0.5]]))


def test_cluster_purity_bad_input():
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        cluster_purity(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), 2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        cluster_purity(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2, 1)


def test_kmeans_update_means_and_filtering():
    values = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]])  # B=1, D=2, N=4
    assignment = torch.tensor([[0, 1, 0, 1]])
    update, counts = kmeans_update(values, assignment, 3)
    assert torch.allclose(update[0], torch.tensor([[2.0, 20.0], [3.0, 30.0], [0.0, 0.0]]))
    assert torch.equal(counts[0], torch.tensor([2.0, 2.0, 0.0]))
    keep = torch.tensor([[True, False, True]])
    update, counts = kmeans_update(values, assignment, 3, keep)
    assert torch.allclose(update[0], torch.tensor([[2.0, 20.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(counts[0], torch.tensor([2.0, 0.0, 0.0]))


def test_kmeans_update_bad_shapes():
    with pytest.raises(ValueError, match="same B and N"):
        kmeans_update(torch.zeros(1, 2, 4), torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="keep must be"):
        kmeans_update(torch.zeros(1, 2, 4), torch.zeros(1, 4, dtype=torch.long), 2, torch.ones(1, 3, dtype=torch.bool))


def test_confidence_weights_sum_to_one_and_pooling_hand_computed():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # B=1, C=1, 2x2
    probs = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.2], [0.2, 0.4]], [[0.0, 0.0], [0.0, 0.0]]]])
    w = confidence_weights(probs)
    assert torch.allclose(w.sum(-1)[0, :2], torch.ones(2))
    assert torch.equal(w[0, 2], torch.zeros(4))  # an absent class gets zero weights, not NaN
    proto = confidence_weighted_pooling(features, probs)
    # class 0: (1 + 4) / 2; class 1: (0.2 + 0.4 + 0.6 + 1.6) / 1.0; class 2: 0
    assert torch.allclose(proto[0, :, 0], torch.tensor([2.5, 2.8, 0.0]))


def test_confidence_weights_random_3d_sum_to_one():
    probs = torch.rand(2, 4, 3, 5, 2).softmax(1)
    assert torch.allclose(confidence_weights(probs).sum(-1), torch.ones(2, 4), atol=1e-6)


def test_pooling_bad_shapes():
    with pytest.raises(ValueError, match="resize the probabilities"):
        confidence_weighted_pooling(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="probabilities must be"):
        confidence_weights(torch.zeros(1, 2, 4))


@pytest.mark.parametrize("progress,ramp,expected", [(0.0, 1.0, 0.1), (0.5, 1.0, 0.3), (1.0, 1.0, 0.5),
                                                    (0.25, 0.5, 0.3), (0.75, 0.5, 0.5), (0.0, 0.0, 0.5)])
def test_purity_threshold_schedule(progress, ramp, expected):
    assert purity_threshold(progress, 0.1, 0.5, ramp) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------- modules
def test_layer_filtering_follows_previous_prediction():
    torch.manual_seed(1)
    layer = KMeansTransformerLayer(4, 8, 8, num_classes=3, num_heads=2, ffn_expansion=2, conv_op=torch.nn.Conv2d,
                                   norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"affine": True})
    pixels = torch.randn(2, 4, 6, 6)
    queries = torch.randn(2, 5, 8)
    previous = torch.rand(2, 3, 6, 6).softmax(1)
    _, pred = layer(pixels, queries, None, 0.5)
    assert pred["keep"] is None
    for threshold in (0.0, 0.4, 1.0):
        _, pred = layer(pixels, queries, previous, threshold)
        assign = pred["mask_logits"].argmax(1).numpy()
        cls = previous.argmax(1).flatten(1).numpy()
        expected = np.zeros((2, 5), bool)
        for b in range(2):
            for l in range(5):
                members = cls[b][assign[b] == l]
                share = max(((members == k).sum() for k in (1, 2)), default=0) / max(len(members), 1)
                expected[b, l] = share >= threshold
        assert np.array_equal(pred["keep"].numpy(), expected)


def test_layer_filtered_clusters_do_not_update():
    """With threshold 1 and a previous prediction of pure background, no cluster is pure: the k-means
    update is zero, so the output equals the one of a layer that gets zero pixel values."""
    torch.manual_seed(2)
    layer = KMeansTransformerLayer(4, 8, 8, num_classes=2, num_heads=2, ffn_expansion=2, conv_op=torch.nn.Conv2d,
                                   norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"affine": True}).eval()
    pixels = torch.randn(1, 4, 4, 4)
    queries = torch.randn(1, 3, 8)
    background = torch.zeros(1, 2, 4, 4)
    background[:, 0] = 1
    out_filtered, pred = layer(pixels, queries, background, 1.0)
    assert not pred["keep"].any()
    zero_update = queries + layer.update_proj(layer.update_norm(torch.zeros(1, 3, 8)))
    q = layer.attn_norm(zero_update)
    expected = zero_update + layer.self_attention(q, q, q, need_weights=False)[0]
    expected = expected + layer.ffn(layer.ffn_norm(expected))
    assert torch.allclose(out_filtered, expected, atol=1e-5)
    out_free, _ = layer(pixels, queries, None, 1.0)
    assert not torch.allclose(out_free, out_filtered)


def test_dynamic_heads_match_per_class_mlp():
    torch.manual_seed(3)
    heads = DynamicClassHeads(feature_channels=3, prototype_channels=5, num_classes=2, head_channels=2,
                              embedding_dim=4, conv_op=torch.nn.Conv2d, norm_op=torch.nn.InstanceNorm2d,
                              norm_op_kwargs={"affine": True})
    features = torch.randn(2, 3, 3, 3)
    prototypes = torch.randn(2, 2, 5)
    out = heads(features, prototypes)
    assert out.shape == (2, 2, 3, 3)
    with torch.no_grad():
        cond = torch.cat([heads.prototype_proj(prototypes), heads.class_embedding[None].expand(2, -1, -1)], -1)
        params = heads.controller(cond).numpy()
        x = heads.precls(features).flatten(2).numpy()  # B, h, N
    for b in range(2):
        for k in range(2):
            p = params[b, k]
            w1, b1 = p[0:4].reshape(2, 2), p[4:6]
            w2, b2 = p[6:10].reshape(2, 2), p[10:12]
            w3, b3 = p[12:14], p[14]
            y = np.maximum(w1 @ x[b] + b1[:, None], 0)
            y = np.maximum(w2 @ y + b2[:, None], 0)
            y = w3 @ y + b3
            assert np.allclose(out[b, k].detach().numpy().ravel(), y, atol=1e-5)


# ----------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("dim,size", [(2, (16, 16)), (3, (16, 16, 8))])
def test_network_shapes_with_and_without_deep_supervision(dim, size):
    net = tiny_iapl(dim, num_classes=3)
    x = torch.randn(2, 1, *size)
    out = net(x)
    # 3-stage U-Net: decoder stages at 1/2 and full resolution -> transformer on the 1/2 scale only
    assert net.transformer_stages == [0]
    assert isinstance(out, list) and len(out) == 1 + 2 + 1
    assert out[0].shape == (2, 3, *size)
    half = tuple(s // 2 for s in size)
    for aux in out[1:]:
        assert aux.shape == (2, 3, *half)
        assert torch.allclose(aux.exp().sum(1), torch.ones(2, *half), atol=1e-4)  # log-probabilities
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert torch.is_tensor(logits) and logits.shape == (2, 3, *size)


def test_network_uses_three_scales_of_a_deeper_unet():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kw = arch_kwargs(2, n_stages=5, features=(4, 8, 8, 16, 16))
    unet = get_network_from_plans(ARCH, kw, ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 2, deep_supervision=True)
    net = IAPLNetwork(unet, 2, num_queries=4, embed_dim=8, num_heads=2, prototype_embedding_dim=8)
    assert net.transformer_stages == [0, 1, 2]  # decoder stages at 1/8, 1/4, 1/2; full resolution excluded
    assert len(net.transformer_layers) == 6
    out = net(torch.randn(1, 1, 32, 32))
    assert [tuple(o.shape[2:]) for o in out] == [(32, 32), (16, 16), (16, 16), (16, 16), (8, 8), (8, 8),
                                                     (4, 4), (4, 4)]


def test_gradients_flow_to_common_prototypes():
    net = tiny_iapl(3)
    out = net(torch.randn(1, 1, 8, 8, 8))
    out[0].square().mean().backward()  # main logits only
    g = net.queries.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    net.zero_grad()
    out = net(torch.randn(1, 1, 8, 8, 8))
    out[1].mean().backward()  # final transformer prediction only
    assert net.queries.grad.abs().sum() > 0
    assert net.heads.controller.weight.grad is None  # the heads do not feed the transformer prediction


def test_training_progress_moves_threshold():
    net = tiny_iapl(2)
    assert net.purity_threshold == pytest.approx(0.5)  # a fresh (inference) network is at the end of the ramp
    assert net.set_training_progress(0.0) == pytest.approx(0.1)
    assert net.set_training_progress(0.5) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="progress"):
        net.set_training_progress(1.5)


def test_network_bad_input_and_options():
    net = tiny_iapl(3)
    with pytest.raises(ValueError, match="built for 3D"):
        net(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        tiny_iapl(2, num_heads=3)
    with pytest.raises(ValueError, match="num_classes"):
        IAPLNetwork(tiny_unet(2, 1), 1)
    with pytest.raises(ValueError, match="purity_threshold_end"):
        tiny_iapl(2, purity_threshold_end=1.5)
    with pytest.raises(ValueError, match="needs a U-Net"):
        IAPLNetwork(torch.nn.Conv2d(1, 2, 1), 2)


# ----------------------------------------------------------------------------------------- loss
def _bce(z, y):
    return np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y)


def test_loss_hand_computed_main_and_aux():
    z = np.array([[[[2.0, -1.0]], [[-2.0, 1.0]]]], np.float32)  # B=1, K=2, 1x2
    labels = np.array([[[0, 1]]])
    y = np.stack([labels == 0, labels == 1], 1).astype(np.float32)
    p = 1 / (1 + np.exp(-z))
    dice = (2 * (p[:, 1] * y[:, 1]).sum() + 1e-5) / (p[:, 1].sum() + y[:, 1].sum() + 1e-5)
    main = _bce(z, y) + (1 - dice)
    lp = np.log(np.array([[[[0.75, 0.25]], [[0.25, 0.75]]]], np.float32))
    ce = -(lp[0, 0, 0, 0] + lp[0, 1, 0, 1]) / 2
    q = np.exp(lp)
    aux_dice = (2 * 0.75 + 1e-5) / (q[:, 1].sum() + 1 + 1e-5)
    expected = main + 0.05 * (ce + 1 - aux_dice)
    loss = IAPLLoss(2)(torch.tensor(z), torch.tensor(labels, dtype=torch.float32)[:, None], [torch.tensor(lp)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    no_aux = IAPLLoss(2, aux_weight=0.0)(torch.tensor(z), torch.tensor(labels), [torch.tensor(lp)])
    assert no_aux.item() == pytest.approx(main, rel=1e-5)


def test_loss_aux_target_resized_nearest():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[:, :2, :2] = 1  # top-left quarter
    lp = torch.log(torch.full((1, 2, 2, 2), 0.5))
    lp_good = torch.log(torch.tensor([[[[0.01, 0.99], [0.99, 0.99]], [[0.99, 0.01], [0.01, 0.01]]]]))
    logits = torch.zeros(1, 2, 4, 4)
    loss = IAPLLoss(2, aux_weight=1.0)
    assert loss(logits, labels, [lp_good]) < loss(logits, labels, [lp])


def test_soft_dice_absent_class_is_perfect():
    """IAPL's Dice (the package's soft Dice per image, foreground channels): 1 - Dice of an absent class that is
    not predicted is 0."""
    probs = torch.zeros(1, 2, 3, 1)
    probs[:, 0] = 1
    labels = torch.zeros(1, 3, 1, dtype=torch.long)
    assert 1 + soft_dice_loss(probs, labels, include_background=False).item() == pytest.approx(0.0, abs=1e-6)
    assert IAPLLoss(2)._dice(probs, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_bad_options_and_shapes():
    with pytest.raises(ValueError, match="num_classes"):
        IAPLLoss(1)
    with pytest.raises(ValueError, match="aux_weight"):
        IAPLLoss(3, aux_weight=-1)
    loss = IAPLLoss(3)
    with pytest.raises(ValueError, match="built for 3"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="aux_log_probs"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), [torch.zeros(1, 2, 2, 2)])


# ----------------------------------------------------------------------------------------- trainer
def test_trainer_builds_network_from_plans_with_hparam_override(monkeypatch):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunetv2_cimis.training.trainers.iapl import IAPLDeepSupervisionLoss, nnUNetTrainerIAPL

    kw = arch_kwargs(3, n_stages=3, features=(8, 16, 32))
    cm = ConfigurationManager({"architecture": {"network_class_name": ARCH, "arch_kwargs": kw,
                                                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
                               "patch_size": [16, 16, 16]})

    class _PM:
        plans_name = "tiny"

    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"num_queries": 5, "embed_dim": 16}))
    net = nnUNetTrainerIAPL.build_network_architecture(_PM(), cm, 1, 3, enable_deep_supervision=False)
    assert isinstance(net, IAPLNetwork) and net.queries.shape == (5, 16)
    out = net(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)
    monkeypatch.setenv("nnUNet_cimis_hparams", json.dumps({"num_heads": 3}))
    with pytest.raises(SystemExit, match="num_heads=3"):
        nnUNetTrainerIAPL.build_network_architecture(_PM(), cm, 1, 3, enable_deep_supervision=False)
    # the adapter takes nnU-Net's lists and plain tensors
    adapter = IAPLDeepSupervisionLoss(IAPLLoss(3))
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 1, 4, 4)).float()
    lp = torch.log_softmax(torch.randn(1, 3, 2, 2), 1)
    assert adapter(logits, target).item() == pytest.approx(IAPLLoss(3)(logits, target).item())
    assert adapter([logits, lp], [target, target[..., ::2, ::2]]).item() == \
        pytest.approx(IAPLLoss(3)(logits, target, [lp]).item())


def test_kmeans_update_and_pooling_stay_float32_for_many_voxels():
    n = 70000  # more voxels than float16 can count
    values = torch.ones(1, 1, n, dtype=torch.float16)
    update, counts = kmeans_update(values, torch.zeros(1, n, dtype=torch.long), 2)
    assert counts[0, 0].item() == n and update.dtype == torch.float32
    assert update[0, 0, 0].item() == pytest.approx(1.0)
    probs = torch.ones(1, 1, n, 1, dtype=torch.float16)
    proto = confidence_weighted_pooling(torch.full((1, 2, n, 1), 3.0, dtype=torch.float16), probs)
    assert proto.dtype == torch.float32 and torch.allclose(proto, torch.full((1, 1, 2), 3.0), rtol=1e-4)

"""Tests of nnunetv2_cimis.losses.pgcd (PGCD and its channel-weighted feature term), hand-computed values."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.pgcd import PrototypeChannelFeatureDistillation, PrototypeGuidedCalibrationDistillation


def _one_voxel(values):
    """(1, C, 1, 1) tensor from a list of C values."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


# student: softmax of (0, ln 2, 0) = (1/4, 1/2, 1/4); channel 2 is new, merged into background -> (1/2, 1/2)
STUDENT = [0.0, math.log(2.0), 0.0]
# teacher: softmax of (ln 3, 0) = (3/4, 1/4)
TEACHER = [math.log(3.0), 0.0]
KL_TERMS = np.array([0.75 * np.log(0.75 / 0.5), 0.25 * np.log(0.25 / 0.5)])


def test_uniform_is_background_aware_kl_mean_over_old_channels():
    loss = PrototypeGuidedCalibrationDistillation(weighting="uniform", divergence="categorical")(
        _one_voxel(STUDENT), _one_voxel(TEACHER))
    assert loss.item() == pytest.approx(KL_TERMS.sum() / 2, rel=1e-6)


def test_explicit_weights_weight_each_class_term():
    pgcd = PrototypeGuidedCalibrationDistillation(divergence="categorical")
    weights = _one_voxel([2.0, 0.5])
    loss = pgcd(_one_voxel(STUDENT), _one_voxel(TEACHER), weights)
    assert loss.item() == pytest.approx((2.0 * KL_TERMS[0] + 0.5 * KL_TERMS[1]) / 2, rel=1e-6)


def test_mean_over_voxels_and_batch():
    s = torch.cat([_one_voxel(STUDENT), _one_voxel([0.0, 0.0, 0.0])], dim=3)  # 1x2 image
    t = torch.cat([_one_voxel(TEACHER), _one_voxel([0.0, 0.0])], dim=3)
    s, t = torch.cat([s, s]), torch.cat([t, t])  # B = 2
    # second voxel: student (1/3, 1/3, 1/3) -> merged (2/3, 1/3); teacher (1/2, 1/2)
    kl2 = 0.5 * np.log(0.5 / (2 / 3)) + 0.5 * np.log(0.5 / (1 / 3))
    loss = PrototypeGuidedCalibrationDistillation(divergence="categorical")(s, t)
    assert loss.item() == pytest.approx((KL_TERMS.sum() + kl2) / 2 / 2, rel=1e-6)


def test_zero_when_student_matches_teacher_and_gradient_vanishes():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = PrototypeGuidedCalibrationDistillation(divergence="categorical")(z, z.detach().clone())
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert z.grad.abs().max().item() < 1e-7


def test_weighted_loss_is_minimal_at_the_calibrated_teacher():
    # sum_c w_c q_c (log q_c - log p_c) over the simplex is minimal at p = w q / sum(w q): the gradient
    # with respect to the logits vanishes there and not at p = q
    q = np.array([0.6, 0.3, 0.1])
    w = np.array([0.5, 2.0, 0.5])
    target = w * q / (w * q).sum()
    pgcd = PrototypeGuidedCalibrationDistillation(divergence="categorical")
    teacher = _one_voxel(np.log(q).tolist())
    weights = _one_voxel(w.tolist())
    at_target = _one_voxel(np.log(target).tolist()).requires_grad_()
    pgcd(at_target, teacher, weights).backward()
    assert at_target.grad.abs().max().item() < 1e-7
    at_teacher = _one_voxel(np.log(q).tolist()).requires_grad_()
    pgcd(at_teacher, teacher, weights).backward()
    # d/dz_c of (1/3) sum_k w_k q_k (-log p_k) = (1/3) (p_c sum_k w_k q_k - w_c q_c), at p = q
    expected = (q * (w * q).sum() - w * q) / 3
    np.testing.assert_allclose(at_teacher.grad[0, :, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_gradient_pulls_towards_teacher():
    s = _one_voxel(STUDENT).requires_grad_()
    PrototypeGuidedCalibrationDistillation(divergence="categorical")(s, _one_voxel(TEACHER)).backward()
    # teacher wants more background: the background logit must go up, the old class down
    assert s.grad[0, 0].item() < 0 and s.grad[0, 1].item() > 0


def _binary_kl(q, p):
    q, p = np.asarray(q, float), np.asarray(p, float)
    return q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))


def test_binary_divergence_hand_computed():
    # p = (1/2, 1/2), q = (3/4, 1/4): per-class binary KL, weighted, mean over the 2 old channels
    terms = _binary_kl([0.75, 0.25], [0.5, 0.5])
    pgcd = PrototypeGuidedCalibrationDistillation(divergence="binary")
    assert pgcd(_one_voxel(STUDENT), _one_voxel(TEACHER)).item() == pytest.approx(terms.sum() / 2, rel=1e-6)
    loss = pgcd(_one_voxel(STUDENT), _one_voxel(TEACHER), _one_voxel([2.0, 0.5]))
    assert loss.item() == pytest.approx((2.0 * terms[0] + 0.5 * terms[1]) / 2, rel=1e-6)
    # three old channels: student softmax (0, ln 2, ln 3, 0) = (1, 2, 3, 1)/7, new channel 3 -> bg (2, 2, 3)/7
    s = _one_voxel([0.0, math.log(2.0), math.log(3.0), 0.0])
    t = _one_voxel([0.0, 0.0, math.log(2.0)])  # (1, 1, 2) / 4
    expected = _binary_kl([0.25, 0.25, 0.5], [2 / 7, 2 / 7, 3 / 7]).sum() / 3
    assert pgcd(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_binary_divergence_keeps_the_teacher_as_minimum_for_any_weights():
    q = np.array([0.6, 0.3, 0.1])
    z = _one_voxel(np.log(q).tolist()).requires_grad_()
    pgcd = PrototypeGuidedCalibrationDistillation(divergence="binary")
    loss = pgcd(z, _one_voxel(np.log(q).tolist()), _one_voxel([0.5, 2.0, 0.5]))
    loss.backward()
    assert abs(loss.item()) < 1e-6 and z.grad.abs().max().item() < 1e-6


def test_binary_divergence_is_finite_for_saturated_probabilities():
    s = _one_voxel([60.0, -60.0, -60.0]).requires_grad_()  # p(bg) = 1 to float precision
    t = _one_voxel([-60.0, 60.0])  # the teacher is sure of the old class
    loss = PrototypeGuidedCalibrationDistillation(divergence="binary")(s, t)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 10 and torch.isfinite(s.grad).all()


def test_softmax_calibration_weights_hand_computed():
    pgcd = PrototypeGuidedCalibrationDistillation(weighting="softmax", temperature=0.5)
    feats = _one_voxel([3.0, 0.0])  # norm does not matter: cos to (1, 0) = 1, to (0, 1) = 0
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = pgcd.calibration_weights(feats, protos)
    e = math.exp(2.0)
    np.testing.assert_allclose(w[0, :, 0, 0].numpy(), [2 * e / (e + 1), 2 / (e + 1)], rtol=1e-6)
    assert w.shape == (1, 2, 1, 1)


def test_softmax_weights_skip_classes_without_prototype():
    pgcd = PrototypeGuidedCalibrationDistillation(weighting="softmax", temperature=1.0)
    feats = _one_voxel([1.0, 1.0])  # cos to (1, 0) and (0, 1) = 1/sqrt(2), to (1, 1) = 1
    protos = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([True, False, True])
    w = pgcd.calibration_weights(feats, protos, valid)[0, :, 0, 0].numpy()
    a, b = math.exp(1.0), math.exp(1 / math.sqrt(2))
    np.testing.assert_allclose(w, [2 * a / (a + b), 1.0, 2 * b / (a + b)], rtol=1e-6)
    none_valid = pgcd.calibration_weights(feats, protos, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none_valid, torch.ones(1, 3, 1, 1))


def test_sigmoid_and_uniform_weights():
    feats = _one_voxel([2.0, 0.0])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = PrototypeGuidedCalibrationDistillation("sigmoid", temperature=0.5).calibration_weights(feats, protos)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(w[0, :, 0, 0].numpy(), [2 * sig(1.0), 2 * sig(-1.0)], rtol=1e-6)
    w = PrototypeGuidedCalibrationDistillation("uniform").calibration_weights(feats, protos)
    assert torch.equal(w, torch.ones(1, 2, 1, 1))


def test_zero_features_and_zero_prototypes_give_finite_weights():
    pgcd = PrototypeGuidedCalibrationDistillation()
    w = pgcd.calibration_weights(torch.zeros(1, 4, 2, 2, 2), torch.zeros(3, 4))
    assert torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), np.ones((1, 3, 2, 2, 2)))  # all similarities 0 -> equal weights


def test_weights_are_resized_to_the_logits():
    pgcd = PrototypeGuidedCalibrationDistillation(divergence="categorical")
    s = torch.cat([_one_voxel(STUDENT)] * 4, dim=2).repeat(1, 1, 1, 4)  # 4x4 copies of the voxel
    t = torch.cat([_one_voxel(TEACHER)] * 4, dim=2).repeat(1, 1, 1, 4)
    w_small = _one_voxel([2.0, 0.5]).repeat(1, 1, 2, 2)  # constant at 2x2
    loss = pgcd(s, t, w_small)
    assert loss.item() == pytest.approx((2.0 * KL_TERMS[0] + 0.5 * KL_TERMS[1]) / 2, rel=1e-5)
    s3 = torch.zeros(1, 3, 4, 4, 4)
    t3 = torch.zeros(1, 2, 4, 4, 4)
    assert torch.isfinite(pgcd(s3, t3, torch.ones(1, 2, 2, 2, 2)))


def test_bad_options_and_shapes_raise():
    with pytest.raises(ValueError, match="weighting"):
        PrototypeGuidedCalibrationDistillation(weighting="cosine")
    with pytest.raises(ValueError, match="temperature"):
        PrototypeGuidedCalibrationDistillation(temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        PrototypeGuidedCalibrationDistillation(divergence="js")
    pgcd = PrototypeGuidedCalibrationDistillation()
    with pytest.raises(ValueError, match="same batch and spatial"):
        pgcd(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="more channels"):
        pgcd(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="calibration_weights"):
        pgcd(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same feature tap"):
        pgcd.calibration_weights(torch.zeros(1, 4, 2, 2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="prototype_valid"):
        pgcd.calibration_weights(torch.zeros(1, 4, 2, 2), torch.zeros(2, 4), torch.ones(3, dtype=torch.bool))


def test_channel_feature_term_hand_computed():
    term = PrototypeChannelFeatureDistillation()
    protos = torch.tensor([[1.0, -3.0], [1.0, 1.0], [100.0, 100.0]])
    valid = torch.tensor([True, True, False])
    np.testing.assert_allclose(term.channel_weights(protos, valid).numpy(), [2 / 3, 4 / 3], rtol=1e-6)
    s = _one_voxel([2.0, 1.0]).requires_grad_()
    t = _one_voxel([0.0, 0.0])
    loss = term(s, t, protos, valid)
    assert loss.item() == pytest.approx((2 / 3 * 4 + 4 / 3 * 1) / 2, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(s.grad[0, :, 0, 0].numpy(), [2 / 3 * 2 * 2 / 2, 4 / 3 * 2 * 1 / 2], rtol=1e-6)
    assert torch.equal(term.channel_weights(torch.zeros(2, 2)), torch.ones(2))
    assert torch.equal(term.channel_weights(protos, torch.zeros(3, dtype=torch.bool)), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        term(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 3), protos)

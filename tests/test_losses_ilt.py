"""Tests of nnunetv2_cimis.losses.ilt.FeatureDistillationMSE."""
import pytest
import torch

from nnunetv2_cimis.losses.ilt import FeatureDistillationMSE


def test_mse_by_hand_2d():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]]).view(1, 1, 2, 2)
    assert FeatureDistillationMSE()(s, t).item() == pytest.approx((0 + 4 + 9 + 0) / 4)


def test_mse_by_hand_3d_two_channels():
    s = torch.zeros(1, 2, 1, 1, 2)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 2, 1, 1, 2)
    assert FeatureDistillationMSE()(s, t).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_identical_features_give_zero_and_teacher_gets_no_gradient():
    s = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = FeatureDistillationMSE()(s, t)
    assert loss.item() == 0.0
    (FeatureDistillationMSE()(s, t + 1)).backward()
    assert t.grad is None and s.grad is not None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        FeatureDistillationMSE()(torch.randn(1, 4, 2, 2), torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError):
        FeatureDistillationMSE()(torch.randn(4, 2), torch.randn(4, 2))

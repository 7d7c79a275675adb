"""Tests of nnunetv2_cimis.losses.dapd (dual-aligned prototype distillation), hand-computed values."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.dapd import DualAlignedPrototypeDistillation
from nnunetv2_cimis.losses.prototypes import IGNORE_REGION


def _cos(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _setup():
    """B=1, C=2, a 1x4 image. Regions: voxel 0 -> background, 1 and 2 -> old class 1, 3 ignored."""
    student = torch.tensor([[[[1.0, 2.0, 0.0, 9.0]], [[0.0, 0.0, 2.0, 9.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[1.0, 0.0, 1.0, -9.0]], [[1.0, 1.0, 0.0, -9.0]]]])
    regions = torch.tensor([[[0, 1, 1, IGNORE_REGION]]])
    globals_ = torch.tensor([[0.0, 1.0], [1.0, 0.0], [5.0, 5.0]])  # background, class 1, class 2 (absent)
    return student, teacher, regions, globals_


def test_hand_computed_loss_and_absent_class_is_skipped():
    student, teacher, regions, globals_ = _setup()
    loss = DualAlignedPrototypeDistillation()(student, teacher, regions, globals_)
    # local prototypes: student bg (1, 0), class 1 mean of (2, 0) and (0, 2) = (1, 1)
    #                   teacher bg (1, 1), class 1 mean of (0, 1) and (1, 0) = (0.5, 0.5)
    bg = (1 - _cos([1, 0], [0, 1])) + (1 - _cos([1, 0], [1, 1]))
    c1 = (1 - _cos([1, 1], [1, 0])) + (1 - _cos([1, 1], [0.5, 0.5]))
    assert loss.item() == pytest.approx((bg + c1) / 2, rel=1e-6)  # class 2 has no voxel: not counted


def test_weights_invalid_globals_and_min_voxels():
    student, teacher, regions, globals_ = _setup()
    loss = DualAlignedPrototypeDistillation(global_weight=2.0, local_weight=0.5)(student, teacher, regions, globals_)
    bg = 2 * (1 - _cos([1, 0], [0, 1])) + 0.5 * (1 - _cos([1, 0], [1, 1]))
    c1 = 2 * (1 - _cos([1, 1], [1, 0])) + 0.5 * 0.0
    assert loss.item() == pytest.approx((bg + c1) / 2, rel=1e-6)
    # no global background prototype: the background term keeps only its local alignment
    valid = torch.tensor([False, True, True])
    loss = DualAlignedPrototypeDistillation()(student, teacher, regions, globals_, valid)
    bg = 1 - _cos([1, 0], [1, 1])
    c1 = 1 - _cos([1, 1], [1, 0])
    assert loss.item() == pytest.approx((bg + c1) / 2, rel=1e-6)
    # min_voxels=2: the background (1 voxel) drops out
    loss = DualAlignedPrototypeDistillation(min_voxels=2)(student, teacher, regions, globals_)
    assert loss.item() == pytest.approx(1 - _cos([1, 1], [1, 0]), rel=1e-6)


def test_gradient_hand_computed():
    # one class, one voxel: L = 1 - cos(s, g) with s = (1, 0), g = (0, 1); local term 0 (teacher = student)
    s = torch.tensor([[[[1.0]], [[0.0]]]], requires_grad=True)
    loss = DualAlignedPrototypeDistillation(local_weight=0.0)(s, s.detach(), torch.zeros(1, 1, 1, dtype=torch.long),
                                                              torch.tensor([[0.0, 1.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    # d cos / d s = g/|s||g| - cos * s/|s|^2 = (0, 1): the loss decreases along (0, 1)
    np.testing.assert_allclose(s.grad[0, :, 0, 0].numpy(), [0.0, -1.0], atol=1e-6)


def test_no_class_present_gives_zero_with_graph():
    student, teacher, _, globals_ = _setup()
    regions = torch.full((1, 1, 4), IGNORE_REGION)
    loss = DualAlignedPrototypeDistillation()(student, teacher, regions, globals_)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_zero_features_are_finite():
    s = torch.zeros(2, 3, 2, 2, 2, requires_grad=True)
    loss = DualAlignedPrototypeDistillation()(s, torch.zeros(2, 3, 2, 2, 2), torch.zeros(2, 2, 2, 2, dtype=torch.long),
                                              torch.zeros(2, 3))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(2.0)  # cos of zero vectors is 0 -> both distances 1


def test_prototype_loss_directly():
    dapd = DualAlignedPrototypeDistillation()
    ps = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    pt = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    g = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    loss = dapd.prototype_loss(ps, pt, torch.tensor([5.0, 7.0]), g)
    assert loss.item() == pytest.approx(((2 + 0) + (0 + 1)) / 2)
    with pytest.raises(ValueError, match="counts"):
        dapd.prototype_loss(ps, pt, torch.ones(3), g)
    with pytest.raises(ValueError, match="teacher_prototypes"):
        dapd.prototype_loss(ps, torch.zeros(2, 3), torch.ones(2), g)
    with pytest.raises(ValueError, match="global_valid"):
        dapd.prototype_loss(ps, pt, torch.ones(2), g, torch.ones(3, dtype=torch.bool))


def test_bad_options_and_shapes_raise():
    with pytest.raises(ValueError, match=">= 0"):
        DualAlignedPrototypeDistillation(global_weight=-1)
    with pytest.raises(ValueError, match="min_voxels"):
        DualAlignedPrototypeDistillation(min_voxels=0)
    dapd = DualAlignedPrototypeDistillation()
    f = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="same tap"):
        dapd(f, torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="feature resolution"):
        dapd(f, f, torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="same tap"):
        dapd(f, f, torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(2, 5))

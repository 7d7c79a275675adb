"""Tests of nnunetv2_cimis.losses.lwf.LwFDistillationLoss with hand-computed values."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights
from nnunetv2_cimis.losses.lwf import LwFDistillationLoss


def _log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    return v - np.log(np.exp(v).sum())


def _expected(student, teacher, alpha=1.0):
    """-(1/n_old) sum_c q_c log softmax(student[:n_old])_c for one voxel."""
    n_old = len(teacher)
    q = np.exp(_log_softmax(alpha * np.asarray(teacher)))
    return -(q * _log_softmax(student[:n_old])).sum() / n_old


def test_one_voxel_2d():
    # teacher softmax (ln 3, 0) = (3/4, 1/4); the new channel (5.0) is dropped before the softmax
    s, t = [1.0, 2.0, 5.0], [math.log(3.0), 0.0]
    loss = LwFDistillationLoss()(torch.tensor(s).view(1, 3, 1, 1), torch.tensor(t).view(1, 2, 1, 1))
    by_hand = -(0.75 * (1 - math.log(math.e + math.e ** 2)) + 0.25 * (2 - math.log(math.e + math.e ** 2))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_mean_over_voxels_3d_and_alpha():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 4, 2, 3, 2))
    t = rng.normal(size=(2, 3, 2, 3, 2))
    exp = np.mean([_expected(s[b, :, x, y, z], t[b, :, x, y, z], 2.0)
                   for b in range(2) for x in range(2) for y in range(3) for z in range(2)])
    loss = LwFDistillationLoss(alpha=2.0)(torch.tensor(s), torch.tensor(t))
    assert loss.item() == pytest.approx(exp, rel=1e-5)


def test_no_new_channel_is_plain_soft_cross_entropy():
    s, t = [0.0, 1.0], [1.0, 0.0]
    loss = LwFDistillationLoss()(torch.tensor(s).view(1, 2, 1, 1), torch.tensor(t).view(1, 2, 1, 1))
    assert loss.item() == pytest.approx(_expected(s, t), rel=1e-6)


def test_deep_supervision_scales():
    rng = np.random.default_rng(1)
    shapes = [(4, 4), (2, 2), (1, 1)]
    s = [rng.normal(size=(1, 3, *sh)) for sh in shapes]
    t = [rng.normal(size=(1, 2, *sh)) for sh in shapes]
    w = [2 / 3, 1 / 3, 0.0]
    exp = sum(wi * np.mean([_expected(si[0, :, x, y], ti[0, :, x, y]) for x in range(si.shape[2])
                            for y in range(si.shape[3])]) for wi, si, ti in zip(w, s, t))
    loss = apply_over_scales(LwFDistillationLoss(), deep_supervision_weights(3),
                             [torch.tensor(x) for x in s], [torch.tensor(x) for x in t])
    assert loss.item() == pytest.approx(exp, rel=1e-5)


def test_gradient_reaches_student_old_channels_only():
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    t = torch.randn(1, 2, 2, 2, requires_grad=True)
    LwFDistillationLoss()(s, t).backward()
    assert t.grad is None
    assert torch.all(s.grad[:, 2] == 0) and s.grad[:, :2].abs().sum() > 0


def test_bad_inputs_raise():
    loss = LwFDistillationLoss()
    with pytest.raises(ValueError, match="teacher has 3 channels"):
        loss(torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="same batch and spatial"):
        loss(torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y\)"):
        loss(torch.randn(3, 2), torch.randn(3, 2))
    for alpha in (0, -1.0, True, "1"):
        with pytest.raises(ValueError):
            LwFDistillationLoss(alpha=alpha)

"""Tests of nnunetv2_cimis.losses.prototypes: masks, sums, safe division, old-class regions, EMA."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.prototypes import (IGNORE_REGION, EMAPrototype, all_reduce_prototype_sums, class_masks,
                                              local_prototypes, old_class_regions, prototype_sums,
                                              prototypes_from_sums)


def _features_2d():
    # B=1, C=2, 2x2 image; voxel features (1,0) (3,2) (0,4) (2,2)
    f = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    g = torch.tensor([[0.0, 2.0], [4.0, 2.0]])
    return torch.stack([f, g])[None]


def test_class_masks_selects_values_in_order_and_respects_valid():
    labels = torch.tensor([[[0, 2], [1, 2]]])
    m = class_masks(labels, [2, 0])
    assert m.shape == (1, 2, 2, 2) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[False, True], [False, True]]
    assert m[0, 1].tolist() == [[True, False], [False, False]]
    valid = torch.tensor([[[True, False], [True, True]]])
    m = class_masks(labels[:, None].float(), [2], valid=valid)  # (B, 1, ...) float labels accepted
    assert m[0, 0].tolist() == [[False, False], [False, True]]


def test_class_masks_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        class_masks(torch.zeros(1, 2, 2, dtype=torch.long), [])
    with pytest.raises(ValueError, match="shape"):
        class_masks(torch.zeros(2, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="valid"):
        class_masks(torch.zeros(1, 2, 2, dtype=torch.long), [0], valid=torch.ones(1, 3, 3, dtype=torch.bool))


def test_prototype_sums_and_means_hand_computed():
    feats = _features_2d()
    labels = torch.tensor([[[1, 1], [0, 2]]])
    sums, counts = prototype_sums(feats, class_masks(labels, [0, 1, 2, 3]))
    # class 0: voxel (0,4); class 1: (1,0)+(3,2) = (4,2); class 2: (2,2); class 3: none
    np.testing.assert_allclose(sums.numpy(), [[0, 4], [4, 2], [2, 2], [0, 0]])
    np.testing.assert_allclose(counts.numpy(), [1, 2, 1, 0])
    protos, counts = local_prototypes(feats, class_masks(labels, [0, 1, 2, 3]))
    np.testing.assert_allclose(protos.numpy(), [[0, 4], [2, 1], [2, 2], [0, 0]])
    assert sums.dtype == torch.float32 and protos.dtype == torch.float32


def test_prototypes_from_sums_empty_rows_are_zero_not_nan():
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0]], requires_grad=True)
    counts = torch.tensor([2.0, 0.0])
    p = prototypes_from_sums(sums, counts)
    np.testing.assert_allclose(p.detach().numpy(), [[1, 2], [0, 0]])
    p.sum().backward()
    assert torch.isfinite(sums.grad).all()
    np.testing.assert_allclose(sums.grad.numpy(), [[0.5, 0.5], [0, 0]])


def test_local_prototypes_gradient_and_3d():
    feats = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2).requires_grad_()
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    labels[0, 0] = 1  # the 4 voxels with x == 0
    protos, counts = local_prototypes(feats, class_masks(labels, [1, 5]))
    # channel 0 values 0..7, x==0 -> 0,1,2,3 ; channel 1 values 8..15 -> 8..11
    np.testing.assert_allclose(protos.detach().numpy(), [[1.5, 9.5], [0, 0]])
    np.testing.assert_allclose(counts.numpy(), [4, 0])
    protos[0, 0].backward()
    expected = np.zeros((1, 2, 2, 2, 2))
    expected[0, 0, 0] = 0.25
    np.testing.assert_allclose(feats.grad.numpy(), expected)


def test_prototype_sums_shape_errors():
    with pytest.raises(ValueError, match="same batch and spatial"):
        prototype_sums(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        prototype_sums(torch.zeros(2, 4), torch.zeros(2, 4))


def test_all_reduce_is_noop_without_process_group():
    sums, counts = torch.ones(2, 3), torch.tensor([1.0, 2.0])
    s, c = all_reduce_prototype_sums(sums, counts)
    assert s is sums and c is counts
    with pytest.raises(ValueError, match="counts"):
        all_reduce_prototype_sums(torch.ones(2, 3), torch.ones(3))


def test_old_class_regions_hand_computed():
    labels = torch.tensor([[[0, 0, 3]]])  # B=1, 1x3 image; third voxel is a new class
    # teacher 2 channels; probabilities at the voxels: [0.5-ish bg?]
    z = torch.tensor([[[[0.0, 2.0, 0.0]], [[math.log(3.0), 0.0, 5.0]]]])  # (1, 2, 1, 3)
    r = old_class_regions(labels, z)
    assert r.tolist() == [[[1, 0, IGNORE_REGION]]]
    # voxel 0: p(1) = 3/4 -> kept at 0.7, dropped at 0.8; voxel 1: p(0) = e^2/(e^2+1) = 0.881
    r = old_class_regions(labels[:, None], z, confidence=0.8)
    assert r.tolist() == [[[IGNORE_REGION, 0, IGNORE_REGION]]]
    r = old_class_regions(labels, z, confidence=0.7)
    assert r.tolist() == [[[1, 0, IGNORE_REGION]]]


def test_old_class_regions_errors():
    with pytest.raises(ValueError, match="confidence"):
        old_class_regions(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, 2), confidence=1.5)
    with pytest.raises(ValueError, match="resize_labels_nearest"):
        old_class_regions(torch.zeros(1, 3, 3), torch.zeros(1, 2, 2, 2))


def test_ema_prototype_updates_skips_empty_and_round_trips():
    ema = EMAPrototype(momentum=0.75)
    assert not ema.is_set
    ema.update(torch.tensor([4.0, 0.0]), count=0)  # empty batch: ignored
    assert not ema.is_set and ema.num_updates == 0
    ema.update(torch.tensor([4.0, 0.0]), count=3)  # first update sets
    np.testing.assert_allclose(ema.value.numpy(), [4, 0])
    ema.update(torch.tensor([0.0, 8.0]), count=1)  # 0.75 * (4, 0) + 0.25 * (0, 8)
    np.testing.assert_allclose(ema.value.numpy(), [3, 2])
    other = EMAPrototype(momentum=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.momentum == 0.75 and other.num_updates == 2
    np.testing.assert_allclose(other.value.numpy(), [3, 2])
    other.update(torch.tensor([3.0, 6.0]), count=1)
    np.testing.assert_allclose(other.value.numpy(), [3, 3])
    empty = EMAPrototype()
    empty.load_state_dict(EMAPrototype().state_dict())
    assert not empty.is_set


def test_ema_prototype_initialize_and_errors():
    ema = EMAPrototype(momentum=0.5)
    ema.initialize(torch.tensor([2.0, 2.0]))
    assert ema.num_updates == 0
    ema.update(torch.tensor([0.0, 4.0]), 10)
    np.testing.assert_allclose(ema.value.numpy(), [1, 3])
    with pytest.raises(ValueError, match="momentum"):
        EMAPrototype(momentum=1.0)
    with pytest.raises(ValueError, match="vector"):
        ema.update(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(torch.zeros(3), 1)

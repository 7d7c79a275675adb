"""Tests of nnunetv2_cimis.losses.deep_supervision (nnU-Net's weights, the per-scale helper)."""
import pytest
import torch

from nnunetv2_cimis.losses.deep_supervision import apply_over_scales, deep_supervision_weights


@pytest.mark.parametrize("n, expected", [
    (1, [1.0]),
    (2, [1.0, 0.0]),
    (3, [2 / 3, 1 / 3, 0.0]),                  # (1, 1/2, 0) / 1.5
    (4, [1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0]),
])
def test_weights_match_nnunet_formula(n, expected):
    assert deep_supervision_weights(n) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_weights_reject_bad_counts(bad):
    with pytest.raises(ValueError):
        deep_supervision_weights(bad)


def test_weighted_sum_over_three_scales():
    a = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    b = [torch.tensor(10.0), torch.tensor(20.0), torch.tensor(30.0)]
    out = apply_over_scales(lambda x, y: x * y, [0.5, 0.25, 0.25], a, b)
    assert out.item() == pytest.approx(0.5 * 10 + 0.25 * 40 + 0.25 * 90)


def test_zero_weight_scale_is_not_evaluated():
    calls = []

    def fn(x):
        calls.append(x)
        if x.shape[-1] == 1:
            raise AssertionError("the coarsest scale has weight 0 and must be skipped")
        return x.sum()

    outs = [torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 1)]
    out = apply_over_scales(fn, deep_supervision_weights(3), outs)
    assert out.item() == pytest.approx(2 / 3 * 16 + 1 / 3 * 4)
    assert len(calls) == 2


def test_none_entries_are_passed_through():
    out = apply_over_scales(lambda x, y: x if y is None else x + y, [1.0], [torch.tensor(2.0)], [None])
    assert out.item() == 2.0


def test_length_mismatch_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="scales"):
        apply_over_scales(lambda x: x, [1.0, 0.0], [torch.tensor(1.0)])
    with pytest.raises(ValueError, match="list"):
        apply_over_scales(lambda x: x, [1.0], torch.tensor(1.0))
    with pytest.raises(ValueError):
        apply_over_scales(lambda x: x, [1.0])
    with pytest.raises(ValueError, match="zero"):
        apply_over_scales(lambda x: x, [0.0], [torch.tensor(1.0)])

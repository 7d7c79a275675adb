"""Tests of nnunetv2_cimis.memory.step_memory (StepMemory, carry_forward) and memory.compute
(compute_step_memory, crop_around) with hand-computed prototypes, counts and normalisation statistics."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.memory.compute import compute_step_memory, crop_around
from nnunetv2_cimis.memory.step_memory import STEP_MEMORY_FILENAME, StepMemory, carry_forward


def _memory(labels=None, channels=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    labels = labels or {0: "background", 1: "liver", 2: "spleen"}
    n = max(labels) + 1
    return StepMemory(labels=labels, prototype_tap="decoder.stages.-2",
                      prototypes=torch.randn(n, channels, generator=g),
                      prototype_counts=torch.arange(n, dtype=torch.float64) * 10, **kw)


# ---------------------------------------------------------------- StepMemory
def test_save_load_round_trip(tmp_path):
    bank = [np.array([[0, 1], [2, 1]], dtype=np.uint8), np.zeros((2, 2), dtype=np.uint8)]
    norm = {"decoder.stages.1.norm": {"mean": torch.tensor([0.5, -1.0]), "var": torch.tensor([2.0, 0.25])}}
    m = _memory(norm_stats=norm, label_bank=bank, patch_size=[2, 2], extra={"diffusion": "/x/model"})
    path = str(tmp_path / STEP_MEMORY_FILENAME)
    m.save(path)
    r = StepMemory.load(path)
    assert r.labels == {0: "background", 1: "liver", 2: "spleen"}
    assert all(type(k) is int for k in r.labels)
    assert r.prototype_tap == "decoder.stages.-2"
    torch.testing.assert_close(r.prototypes, m.prototypes)
    assert r.prototypes.dtype == torch.float32
    torch.testing.assert_close(r.prototype_counts, torch.tensor([0.0, 10.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(r.norm_stats["decoder.stages.1.norm"]["mean"], torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(r.norm_stats["decoder.stages.1.norm"]["var"], torch.tensor([2.0, 0.25]))
    assert len(r.label_bank) == 2 and r.label_bank[0].dtype == np.uint8
    np.testing.assert_array_equal(r.label_bank[0], bank[0])
    assert r.patch_size == [2, 2] and r.extra == {"diffusion": "/x/model"}
    assert r.num_labels == 3
    assert not r.has_prototype(0) and r.has_prototype(1) and r.has_prototype(2)
    assert not r.has_prototype(3) and not r.has_prototype(-1)


def test_atomic_save_leaves_no_tmp_file(tmp_path):
    path = str(tmp_path / STEP_MEMORY_FILENAME)
    _memory(seed=1).save(path)
    _memory(seed=2).save(path)  # overwriting an existing memory
    assert os.listdir(tmp_path) == [STEP_MEMORY_FILENAME]
    torch.testing.assert_close(StepMemory.load(path).prototypes, _memory(seed=2).prototypes)


def test_failed_save_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = str(tmp_path / STEP_MEMORY_FILENAME)
    _memory(seed=1).save(path)
    with pytest.raises(Exception):
        _memory(seed=2, extra={"unpicklable": lambda x: x}).save(path)
    torch.testing.assert_close(StepMemory.load(path).prototypes, _memory(seed=1).prototypes)  # old file intact
    assert os.listdir(tmp_path) == [STEP_MEMORY_FILENAME]


def test_missing_file_names_the_command(tmp_path):
    with pytest.raises(CIMISError, match="nnUNetv2_cimis_step_memory"):
        StepMemory.load(str(tmp_path / "fold_0" / STEP_MEMORY_FILENAME))


def test_corrupt_files(tmp_path):
    path = str(tmp_path / STEP_MEMORY_FILENAME)
    with open(path, "wb") as f:
        f.write(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(CIMISError, match="cannot be read"):
        StepMemory.load(path)
    _memory().save(path)
    with open(path, "rb") as f:
        head = f.read(100)
    with open(path, "wb") as f:  # truncated
        f.write(head)
    with pytest.raises(CIMISError, match="cannot be read"):
        StepMemory.load(path)
    torch.save([1, 2, 3], path)  # a torch file, but not a step memory
    with pytest.raises(CIMISError, match="not a step memory"):
        StepMemory.load(path)
    torch.save({"format_version": 99}, path)
    with pytest.raises(CIMISError, match="not a step memory"):
        StepMemory.load(path)


def test_shape_checks():
    with pytest.raises(ValueError, match="prototypes must be"):
        StepMemory({0: "bg", 3: "x"}, "t", torch.zeros(3, 2), torch.zeros(4))  # needs 4 rows (max label 3)
    with pytest.raises(ValueError, match="prototypes must be"):
        StepMemory({0: "bg", 1: "x"}, "t", torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="prototype_counts"):
        StepMemory({0: "bg", 1: "x"}, "t", torch.zeros(2, 5), torch.zeros(3))


# ---------------------------------------------------------------- carry_forward
def test_carry_forward_replaces_old_rows_only():
    labels = {0: "bg", 1: "a", 2: "b", 3: "c", 4: "d"}
    new = StepMemory(labels, "t", torch.arange(10.0).view(5, 2), torch.tensor([50.0, 0, 0, 7, 9], dtype=torch.float64))
    old = StepMemory({0: "bg", 1: "a", 2: "b"}, "t", torch.tensor([[-1.0, -1], [-2, -2], [-3, -3]]),
                     torch.tensor([40.0, 11, 0], dtype=torch.float64))  # no prototype for label 2
    out = carry_forward(new, old, [1, 2])
    expected = torch.tensor([[0.0, 1], [-2, -2], [4, 5], [6, 7], [8, 9]])  # row 1 from old; 0, 2, 3, 4 kept
    torch.testing.assert_close(out.prototypes, expected)
    torch.testing.assert_close(out.prototype_counts, torch.tensor([50.0, 11, 0, 7, 9], dtype=torch.float64))
    assert carry_forward(new, None, [1, 2]) is new


def test_carry_forward_channel_mismatch():
    new = _memory(channels=3)
    old = _memory(channels=4)
    with pytest.raises(CIMISError, match="4 channels .* has 3"):
        carry_forward(new, old, [1])


# ---------------------------------------------------------------- crop_around
def test_crop_around_inside_and_padded():
    a = np.arange(1, 26, dtype=np.int16).reshape(1, 5, 5)  # values 1..25
    np.testing.assert_array_equal(crop_around(a, (2, 2), (3, 3)), a[:, 1:4, 1:4])
    np.testing.assert_array_equal(crop_around(a, (2, 2), (2, 2)), a[:, 1:3, 1:3])  # lo = c - s // 2
    corner = crop_around(a, (0, 0), (3, 3), pad_value=-7)
    assert corner.dtype == np.int16 and corner.shape == (1, 3, 3)
    np.testing.assert_array_equal(corner[0], [[-7, -7, -7], [-7, 1, 2], [-7, 6, 7]])
    far = crop_around(a, (4, 4), (4, 2))  # rows 2..5 (5 is outside), cols 3..4
    np.testing.assert_array_equal(far[0], [[14, 15], [19, 20], [24, 25], [0, 0]])
    big = crop_around(a, (2, 2), (7, 7))  # larger than the image: padded on every side
    assert big.shape == (1, 7, 7) and big[0, 1:6, 1:6].tolist() == a[0].tolist() and big.sum() == a.sum()


def test_crop_around_3d_and_channels():
    a = np.stack([np.ones((2, 3, 4)), 2 * np.ones((2, 3, 4))]).astype(np.float32)
    c = crop_around(a, (0, 1, 3), (2, 2, 2))
    # x: lo -1 -> out[1:2] = a[0:1]; y: lo 0 -> 0..1; z: lo 2 -> 2..3
    assert c.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(c[:, 0], 0)
    np.testing.assert_array_equal(c[0, 1], 1)
    np.testing.assert_array_equal(c[1, 1], 2)


# ---------------------------------------------------------------- compute_step_memory
class _TinyNet(nn.Module):
    """decoder.stages = [1x1 conv, weights (1, 2), biases (0, 1): features (x, 2x + 1)], then an InstanceNorm."""

    def __init__(self, dim=3):
        super().__init__()
        conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
        self.decoder = nn.Module()
        self.decoder.stages = nn.ModuleList([conv(1, 2, 1), norm(2)])
        with torch.no_grad():
            self.decoder.stages[0].weight.copy_(torch.tensor([1.0, 2.0]).view((2, 1) + (1,) * dim))
            self.decoder.stages[0].bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return [self.decoder.stages[1](self.decoder.stages[0](x))]  # a list, as with deep supervision


class _FakeDataset:
    def __init__(self, cases):
        self.cases = cases

    def load_case(self, identifier):
        data, seg = self.cases[identifier]
        return data, seg, None, {}


INTENSITY = {0: 0.0, 1: 2.0, 2: 5.0}  # constant intensity per label; background 0 = the padding value


def _case(shape, voxels):
    """Image and seg (1, *shape): background 0 except one voxel per label (so every crop is determined)."""
    data = np.zeros((1,) + shape, dtype=np.float32)
    seg = np.zeros((1,) + shape, dtype=np.int8)
    for label, pos in voxels.items():
        data[(0,) + pos] = INTENSITY[label]
        seg[(0,) + pos] = label
    return data, seg


LABELS = {0: "background", 1: "a", 2: "b", 3: "not in the data"}


def _cases_3d():
    return _FakeDataset({"A": _case((4, 4, 4), {1: (1, 1, 1), 2: (3, 3, 3)}),
                         "B": _case((3, 3, 3), {1: (0, 0, 0)})})


def test_compute_step_memory_3d_by_hand():
    """Patch 2^3, crop = [c - 1, c + 1) per axis.

    Case A (4^3): centre (2,2,2) -> [1,3)^3 holds label 1's voxel: 1 x label 1, 7 x bg; label 1 at (1,1,1) ->
    [0,2)^3: 1 x label 1, 7 x bg; label 2 at (3,3,3) -> [2,4)^3: 1 x label 2, 7 x bg.
    Case B (3^3): centre (1,1,1) -> [0,2)^3: 1 x label 1, 7 x bg; label 1 at (0,0,0) -> [-1,1)^3: the voxel and
    7 padded (bg) voxels. Counts: bg 35, label 1 4, label 2 1, label 3 0 (40 voxels = 5 crops x 8).
    """
    net = _TinyNet().train()
    mem = compute_step_memory(net, _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"))
    assert net.training  # the training mode is restored
    assert mem.labels == LABELS and mem.prototype_tap == "decoder.stages.-2" and mem.patch_size == [2, 2, 2]
    torch.testing.assert_close(mem.prototype_counts, torch.tensor([35.0, 4, 1, 0], dtype=torch.float64))
    # prototypes = features (i, 2i + 1) of each label's intensity i; no voxel -> zero row
    torch.testing.assert_close(mem.prototypes, torch.tensor([[0.0, 1], [2, 5], [5, 11], [0, 0]]))
    assert mem.has_prototype(2) and not mem.has_prototype(3)
    # the norm layer's input is the conv output: channel 0 = x over the 40 voxels: 35 x 0, 4 x 2, 1 x 5
    mean0 = (4 * 2 + 5) / 40
    var0 = (4 * 4 + 25) / 40 - mean0 ** 2
    assert set(mem.norm_stats) == {"decoder.stages.1"}
    stats = mem.norm_stats["decoder.stages.1"]
    torch.testing.assert_close(stats["mean"], torch.tensor([mean0, 2 * mean0 + 1]))
    torch.testing.assert_close(stats["var"], torch.tensor([var0, 4 * var0]))
    # label bank: the first class-centred crop (label 1) of each case
    assert len(mem.label_bank) == 2
    expected_a = np.zeros((2, 2, 2), dtype=np.uint8)
    expected_a[1, 1, 1] = 1
    expected_b = np.zeros((2, 2, 2), dtype=np.uint8)
    expected_b[1, 1, 1] = 1  # (0,0,0) lands at (1,1,1) of the padded crop
    for got, exp in zip(mem.label_bank, [expected_a, expected_b]):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, exp)
    # no hooks left on the network
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_compute_step_memory_max_cases_and_bank_size():
    net = _TinyNet().eval()
    mem = compute_step_memory(net, _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"), max_cases=1)
    torch.testing.assert_close(mem.prototype_counts, torch.tensor([21.0, 2, 1, 0], dtype=torch.float64))
    assert len(mem.label_bank) == 1 and not net.training
    mem = compute_step_memory(net, _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"), bank_size=1)
    assert len(mem.label_bank) == 1
    torch.testing.assert_close(mem.prototype_counts, torch.tensor([35.0, 4, 1, 0], dtype=torch.float64))


def test_compute_step_memory_negative_seg_is_background():
    data, seg = _case((4, 4, 4), {1: (1, 1, 1), 2: (3, 3, 3)})
    seg[0, 0] = -1  # nnU-Net marks voxels outside the nonzero mask with -1
    mem = compute_step_memory(_TinyNet(), _FakeDataset({"A": (data, seg)}), ["A"], [2, 2, 2], LABELS,
                              torch.device("cpu"))
    torch.testing.assert_close(mem.prototype_counts, torch.tensor([21.0, 2, 1, 0], dtype=torch.float64))


def test_compute_step_memory_2d_plans():
    """2D: data (C, Z, X, Y), one slice per crop. Label 1 at (z=1, 1, 1); patch 2x2.

    Centre (1, 2, 2) -> slice 1, [1,3)^2: 1 x label 1, 3 x bg; label 1 -> slice 1, [0,2)^2: 1 x label 1, 3 x bg.
    """
    data, seg = _case((3, 4, 4), {1: (1, 1, 1)})
    mem = compute_step_memory(_TinyNet(dim=2), _FakeDataset({"A": (data, seg)}), ["A"], [2, 2],
                              {0: "background", 1: "a"}, torch.device("cpu"))
    torch.testing.assert_close(mem.prototype_counts, torch.tensor([6.0, 2], dtype=torch.float64))
    torch.testing.assert_close(mem.prototypes, torch.tensor([[0.0, 1], [2, 5]]))
    mean0 = 2 * 2 / 8
    var0 = 2 * 4 / 8 - mean0 ** 2
    torch.testing.assert_close(mem.norm_stats["decoder.stages.1"]["mean"], torch.tensor([mean0, 2 * mean0 + 1]))
    torch.testing.assert_close(mem.norm_stats["decoder.stages.1"]["var"], torch.tensor([var0, 4 * var0]))
    assert len(mem.label_bank) == 1
    np.testing.assert_array_equal(mem.label_bank[0], [[0, 0], [0, 1]])


def test_compute_step_memory_no_case():
    with pytest.raises(ValueError, match="no training case"):
        compute_step_memory(_TinyNet(), _cases_3d(), [], [2, 2, 2], LABELS, torch.device("cpu"))


def test_compute_step_memory_bad_tap_is_a_cimis_error():
    with pytest.raises(CIMISError, match="no module"):
        compute_step_memory(_TinyNet(), _cases_3d(), ["A"], [2, 2, 2], LABELS, torch.device("cpu"),
                            prototype_tap="decoder.stages.5")

"""Tests of the patient split and split files (scenarios.splits) and of the label remapping and staged
folders of scenarios.datasets."""
import json
import os

import numpy as np
import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.scenarios.datasets import remap, staged_folder
from nnunetv2_cimis.scenarios.splits import split_cases, write_splits

CASES = [f"case_{i:03d}" for i in range(20)]


# ---------------------------------------------------------------- split_cases
def test_split_disjoint_covering_and_sizes():
    subsets, test = split_cases(CASES, 3, 0.2, seed=0)
    assert len(test) == 4  # round(0.2 * 20)
    assert sorted(len(s) for s in subsets) == [5, 5, 6]  # 16 remaining cases over 3 steps
    everything = [c for s in subsets for c in s] + test
    assert sorted(everything) == CASES  # covering, and no case twice (disjoint)
    assert len(set(everything)) == len(everything)
    for s in subsets + [test]:
        assert s == sorted(s)
        assert all(type(c) is str for c in s)


@pytest.mark.parametrize("n_cases,fraction,n_test", [(10, 0.3, 3), (7, 0.01, 1), (9, 0.5, 4), (11, 0.5, 6)])
def test_test_set_size(n_cases, fraction, n_test):
    # n_test = max(1, round(fraction * n)): 9 * 0.5 = 4.5 -> 4 (round half to even), 11 * 0.5 = 5.5 -> 6
    subsets, test = split_cases([f"c{i}" for i in range(n_cases)], 2, fraction, seed=1)
    assert len(test) == n_test
    assert sum(len(s) for s in subsets) == n_cases - n_test


def test_split_is_seeded_and_independent_of_input_order():
    a = split_cases(CASES, 2, 0.2, seed=42)
    b = split_cases(list(reversed(CASES)), 2, 0.2, seed=42)
    assert a == b


def test_different_seed_gives_a_different_split():
    a = split_cases(CASES, 2, 0.2, seed=0)
    b = split_cases(CASES, 2, 0.2, seed=1)
    assert a != b


def test_step_with_fewer_than_two_cases_raises():
    # 7 cases: 1 test, 6 remain; 3 steps x 2 is fine, 4 steps x 2 is not
    cases = [f"c{i}" for i in range(7)]
    subsets, test = split_cases(cases, 3, 0.1, seed=0)
    assert [len(s) for s in subsets] == [2, 2, 2] and len(test) == 1
    with pytest.raises(CIMISError, match="at least 2 cases"):
        split_cases(cases, 4, 0.1, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_raises(fraction):
    with pytest.raises(CIMISError, match="test-fraction"):
        split_cases(CASES, 2, fraction, seed=0)


# ---------------------------------------------------------------- write_splits
def _read_splits(folder):
    with open(os.path.join(folder, "splits_final.json")) as f:
        return json.load(f)


def test_write_splits_five_folds(tmp_path):
    cases = [f"c{i}" for i in range(12)]
    write_splits(str(tmp_path), list(reversed(cases)))
    splits = _read_splits(tmp_path)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(cases)  # every case validated exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == sorted(cases)
    write_splits(str(tmp_path), cases)
    assert _read_splits(tmp_path) == splits  # seeded: same folds whatever the input order


def test_write_splits_few_cases_holds_out_the_last(tmp_path):
    write_splits(str(tmp_path), ["b", "c", "a"])
    assert _read_splits(tmp_path) == [{"train": ["a", "b"], "val": ["c"]}]


# ---------------------------------------------------------------- remap
def test_remap_by_hand():
    seg = np.array([[[0, 1], [2, 3]], [[3, 3], [1, 0]]], dtype=np.int16)
    out = remap(seg, {2: 5, 3: 1}, known=[0, 1, 2, 3], where="x")
    expected = np.array([[[0, 0], [5, 1]], [[1, 1], [0, 0]]])  # 1 is unlisted -> 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and out.shape == seg.shape


def test_remap_empty_mapping_gives_background_only():
    seg = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(remap(seg, {}, [0, 1, 2], "x"), [0, 0, 0, 0])


def test_remap_declared_but_absent_values_and_float_input():
    seg = np.array([0.0, 4.0, 4.0])
    np.testing.assert_array_equal(remap(seg, {4: 2, 7: 3}, [0, 4, 7], "x"), [0, 2, 2])


@pytest.mark.parametrize("bad", [9, -1])
def test_remap_unknown_value_raises_and_names_the_file(bad):
    seg = np.array([0, 1, bad])
    with pytest.raises(CIMISError, match=rf"case_7\.nii\.gz contains label values \[{bad}\]"):
        remap(seg, {1: 1}, [0, 1, 2], "case_7.nii.gz")


# ---------------------------------------------------------------- staged_folder
def test_staged_folder_renamed_on_success(tmp_path):
    final = tmp_path / "raw" / "Dataset900_X"
    with staged_folder(str(final)) as tmp:
        assert not final.exists()
        assert os.path.isdir(tmp) and os.path.dirname(tmp) == str(final.parent)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            f.write("{}")
    assert (final / "dataset.json").read_text() == "{}"
    assert os.listdir(final.parent) == ["Dataset900_X"]  # no temporary folder left


def test_staged_folder_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "Dataset901_X"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_folder(str(final)) as tmp:
            open(os.path.join(tmp, "half_written.nii.gz"), "w").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_staged_folder_leaves_nothing_on_keyboard_interrupt(tmp_path):
    final = tmp_path / "Dataset902_X"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(str(final)):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_staged_folder_existing_target_raises_and_is_kept(tmp_path):
    final = tmp_path / "Dataset903_X"
    final.mkdir()
    (final / "keep.txt").write_text("mine")
    with pytest.raises(CIMISError, match="already exists"):
        with staged_folder(str(final)):
            pass
    assert (final / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["Dataset903_X"]


def test_staged_folder_replaces_a_stale_partial_folder(tmp_path):
    stale = tmp_path / ".Dataset904_X.partial"
    stale.mkdir()
    (stale / "old.txt").write_text("left by an interrupted run")
    with staged_folder(str(tmp_path / "Dataset904_X")) as tmp:
        assert os.listdir(tmp) == []
    assert os.listdir(tmp_path / "Dataset904_X") == []

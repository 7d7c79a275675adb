"""NSD and HD95 through MONAI (nnunetv2_cimis.evaluation.surface), against hand-computed values."""
import math

import numpy as np
import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.evaluation.surface import parse_tolerances, surface_metrics


def _cubes():
    """A 4x4x4 cube (value 1) and the same cube shifted by one voxel along axis 0 (2 mm there, 1 mm in-plane)."""
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = 1
    return ref, pred


def test_shifted_cube_hand_computed():
    # Border voxels (mask minus its erosion): 56 per cube. Of the reference's, the two rings at z=3,4 (24) lie on
    # the prediction's border (0 mm), the 4 centre voxels of the z=5 face are 1 mm from the prediction's ring at
    # z=5 and its 12 ring voxels 0 mm; the 16 voxels of the z=2 face are 2 mm away. Symmetric for the prediction.
    ref, pred = _cubes()
    spacing = (2.0, 1.0, 1.0)
    tight = surface_metrics(ref, pred, [1], {1: 1.0}, spacing)[1]
    assert tight["NSD"] == pytest.approx((40 + 40) / (56 + 56), abs=1e-6)
    assert tight["HD95"] == pytest.approx(2.0)  # 16 of 56 distances are 2 mm: the 95th percentile is 2 mm
    loose = surface_metrics(ref, pred, [1], {1: 2.5}, spacing)[1]
    assert loose["NSD"] == pytest.approx(1.0)
    same = surface_metrics(ref, ref, [1], {1: 1.0}, spacing)[1]
    assert same == {"NSD": pytest.approx(1.0), "HD95": pytest.approx(0.0)}


def test_empty_masks():
    ref, pred = _cubes()
    empty = np.zeros_like(ref)
    both = surface_metrics(empty, empty, [1], {1: 1.0}, (1, 1, 1))[1]
    assert math.isnan(both["NSD"]) and math.isnan(both["HD95"])
    missed = surface_metrics(ref, empty, [1], {1: 1.0}, (1, 1, 1))[1]
    assert missed["NSD"] == 0.0 and math.isnan(missed["HD95"])
    with pytest.raises(CIMISError, match="different shapes"):
        surface_metrics(ref, pred[:5], [1], {1: 1.0}, (1, 1, 1))
    with pytest.raises(CIMISError, match="spacing"):
        surface_metrics(ref, pred, [1], {1: 1.0}, (1, 1))


def test_parse_tolerances():
    names = {1: "liver", 2: "aorta"}
    assert parse_tolerances([], names) == {1: 2.0, 2: 2.0}
    assert parse_tolerances(["3"], names) == {1: 3.0, 2: 3.0}
    assert parse_tolerances(["1", "liver=5"], names) == {1: 5.0, 2: 1.0}
    for bad, msg in ((["pizza=2"], "no class 'pizza'"), (["x"], "millimetres"), (["0"], "> 0")):
        with pytest.raises(CIMISError, match=msg):
            parse_tolerances(bad, names)

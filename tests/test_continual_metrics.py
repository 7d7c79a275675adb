"""Hand-computed tests of the continual metrics."""
import math

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.evaluation import continual_metrics as cm

NAN = float("nan")
CPS = [[1, 2], [3], [4]]
STEP0 = {1: [0.8, 1.0], 2: [0.6, NAN]}
CASE_DICE = {
    "A": {0: STEP0,
          1: {1: [0.7, 0.7], 2: [0.5, 0.3], 3: [0.9, 0.5]},
          2: {1: [0.5, 0.6], 2: [NAN, NAN], 3: [0.8, 0.8], 4: [0.2, 0.4]}},
    "B": {0: STEP0,
          1: {1: [1.0, 1.0], 2: [0.2, 0.4], 3: [0.5, 0.5]}},
}


def close(a, b):
    if math.isnan(b):
        return math.isnan(a)
    return a == pytest.approx(b, abs=1e-12)


def test_per_class_nan_aware():
    d = cm.per_class_dice(CASE_DICE)
    # by hand: means over cases, NaN cases dropped, all-NaN gives NaN
    expected_a = {0: {1: 0.9, 2: 0.6}, 1: {1: 0.7, 2: 0.4, 3: 0.7}, 2: {1: 0.55, 2: NAN, 3: 0.8, 4: 0.3}}
    for s, row in expected_a.items():
        for c, v in row.items():
            assert close(d["A"][s][c], v), (s, c)


def test_step_means():
    steps = cm.step_means(cm.per_class_dice(CASE_DICE), CPS)
    a = steps["A"]
    assert math.isnan(a[0]["old"]) and close(a[0]["new"], 0.75) and close(a[0]["all"], 0.75)
    assert close(a[1]["old"], 0.55) and close(a[1]["new"], 0.7) and close(a[1]["all"], 0.6)
    # step 2: class 2 is NaN and left out of old / all
    assert close(a[2]["old"], 0.675) and close(a[2]["new"], 0.3) and close(a[2]["all"], 0.55)
    b = steps["B"]
    assert close(b[1]["old"], 0.65) and close(b[1]["new"], 0.5) and close(b[1]["all"], 0.6)
    assert set(b) == {0, 1}


def test_forgetting_and_bwt():
    d = cm.per_class_dice(CASE_DICE)
    f = cm.forgetting(d, CPS)
    # A (final step 2): c1 max(0.9, 0.7) - 0.55; c2 final NaN; c3 0.7 - 0.8; c4 learned at the final step
    assert set(f["A"]) == {1, 2, 3}
    assert close(f["A"][1], 0.35) and math.isnan(f["A"][2]) and close(f["A"][3], -0.1)
    # B (final step 1): c1 0.9 - 1.0, c2 0.6 - 0.3
    assert set(f["B"]) == {1, 2}
    assert close(f["B"][1], -0.1) and close(f["B"][2], 0.3)
    bwt = cm.backward_transfer(d, CPS)
    assert close(bwt["A"], ((0.55 - 0.9) + (0.8 - 0.7)) / 2)
    assert close(bwt["B"], ((1.0 - 0.9) + (0.3 - 0.6)) / 2)
    s = cm.summarize(CASE_DICE, CPS)
    assert close(s["mean_forgetting"]["A"], (0.35 - 0.1) / 2)
    assert s["final_step"] == {"A": 2, "B": 1}


def test_unchanged_model_has_zero_forgetting_and_bwt():
    same = {1: [0.5, 0.7], 2: [0.4, 0.4], 3: [0.9, 0.1], 4: [0.3, 0.3]}
    joint = {"joint": {s: {c: same[c] for c in [c for t in CPS[:s + 1] for c in t]} for s in range(3)}}
    d = cm.per_class_dice(joint)
    assert all(close(v, 0.0) for v in cm.forgetting(d, CPS)["joint"].values())
    assert close(cm.backward_transfer(d, CPS)["joint"], 0.0)


def test_only_step0_gives_nan_bwt_and_no_forgetting():
    d = cm.per_class_dice({"A": {0: STEP0}})
    assert cm.forgetting(d, CPS) == {"A": {}}
    assert math.isnan(cm.backward_transfer(d, CPS)["A"])


def test_rows_roundtrip():
    rows = [{"step": 1, "trainer": "A", "case": "c0", "class": "liver", "metric": "Dice", "value": 0.5},
            {"step": 1, "trainer": "A", "case": "c1", "class": "liver", "metric": "Dice", "value": 0.7},
            {"step": 1, "trainer": "A", "case": "c1", "class": "liver", "metric": "IoU", "value": 0.1}]
    assert cm.case_dice_from_rows(rows, label_of={"liver": 3}) == {"A": {1: {3: [0.5, 0.7]}}}


def test_bad_scenarios_raise():
    with pytest.raises(CIMISError, match="listed at step 0 and at step 1"):
        cm.learned_at([[1, 2], [2]])
    with pytest.raises(CIMISError, match="background"):
        cm.learned_at([[0, 1]])
    with pytest.raises(CIMISError, match="outside"):
        cm.step_means({"A": {3: {1: 0.5}}}, CPS)

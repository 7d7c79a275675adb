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


def test_never_learned_classes():
    # A learns 1 at step 0 and keeps a bit; class 2 is 0 at step 0 and 0.004 at step 1 (< eps 0.01); class 3 is
    # learned at step 1 and forgotten to 0 at step 2 (learned, forgetting 0.5); class 4 is 0 at its only step
    d = {"A": {0: {1: 0.8, 2: 0.0},
               1: {1: 0.6, 2: 0.004, 3: 0.5},
               2: {1: 0.4, 2: NAN, 3: 0.0, 4: 0.0}}}
    never = cm.never_learned(d, CPS)
    assert never == {"A": [2, 4]}
    assert cm.never_learned(d, CPS, eps=0.001) == {"A": [4]}
    f = cm.forgetting(d, CPS, never)["A"]
    assert close(f[1], 0.4) and math.isnan(f[2]) and close(f[3], 0.5)
    # the raw definition would say class 2 forgot nothing (0.004 - NaN -> NaN here; at eps 0.001 it is learned)
    assert close(cm.backward_transfer(d, CPS, never)["A"], ((0.4 - 0.8) + (0.0 - 0.5)) / 2)
    s = cm.summarize({"A": {st: {c: [v] for c, v in by.items()} for st, by in d["A"].items()}}, CPS)
    assert s["never_learned"] == {"A": [2, 4]} and s["learned_old"] == {"A": 2}
    assert close(s["mean_forgetting"]["A"], 0.45)


def test_all_zero_run_is_not_no_forgetting():
    zero = {"Z": {s: {c: [0.0, 0.0] for t in CPS[:s + 1] for c in t} for s in range(3)}}
    s = cm.summarize(zero, CPS)
    assert s["never_learned"] == {"Z": [1, 2, 3, 4]}
    assert all(math.isnan(v) for v in s["forgetting"]["Z"].values())
    assert math.isnan(s["mean_forgetting"]["Z"]) and math.isnan(s["bwt"]["Z"])
    assert s["learned_old"] == {"Z": 0}
    # a class absent from every test case (all NaN) cannot be judged: not listed as never learned
    nan_run = {"N": {0: {1: [NAN], 2: [0.5]}}}
    assert cm.summarize(nan_run, CPS)["never_learned"] == {"N": []}


def test_at_a_glance_and_bound_failures():
    runs = {"FT": {0: {1: [0.9], 2: [0.7]}, 1: {1: [0.0], 2: [0.0], 3: [0.5]}},
            "M": {0: {1: [0.9], 2: [0.7]}, 1: {1: [0.8], 2: [0.6], 3: [0.4]}},
            "J": {0: {1: [0.9], 2: [0.9]}, 1: {1: [0.9], 2: [0.9], 3: [0.7]}}}
    s = cm.summarize(runs, CPS)
    g = cm.at_a_glance(s, CPS, ["FT", "M", "J"], ft_trainer="FT", joint_trainer="J")
    assert set(g) == {"FT", "M"}
    assert close(g["M"]["new_dice"], 0.4) and close(g["M"]["ft_new_dice"], 0.5)
    assert close(g["M"]["old_kept"], (0.8 + 0.6) / 1.8) and close(g["FT"]["old_kept"], 0.0)
    assert close(g["M"]["mean_forgetting"], 0.1)
    # joint all at its last step = 0.833 (not below 0.80); FT new 0.5 at step 1 < 0.6
    fails = cm.bound_failures(s, "FT", "J")
    assert fails == ["fine-tuning FT: new-class Dice 0.500 at step 1 (bound 0.60)"]
    assert cm.bound_failures(s, "FT", "J", joint_bound=0.85, ft_new_bound=0.5) == [
        "joint model J: mean Dice over all classes 0.833 < 0.85"]
    assert cm.bound_failures(s, None, None) == []

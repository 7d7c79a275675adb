"""benchmarks/continual.py: aggregation of several seeds' summary.json into mean +- std (hand-computed)."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual  # noqa: E402


def _summary(old, new, all_, forgetting, bwt, joint_all):
    return {"mean_dice": {"M": {"0": {"old": None, "new": 0.9, "all": 0.9}, "1": {"old": old, "new": new, "all": all_}},
                          "J": {"0": {"old": None, "new": joint_all, "all": joint_all}}},
            "mean_forgetting": {"M": forgetting, "J": None}, "bwt": {"M": bwt, "J": None}, "joint_trainer": "J"}


def test_mean_and_sample_std_over_seeds():
    agg = continual.aggregate_seeds({0: _summary(0.8, 0.6, 0.7, 0.1, -0.1, 0.9),
                                     1: _summary(0.6, 0.8, 0.7, 0.3, -0.3, 0.7)}, {0: 60.0, 1: 120.0})
    m = agg["trainers"]["M"]
    assert m["old"]["mean"] == pytest.approx(0.7) and m["old"]["std"] == pytest.approx(math.sqrt(0.02))
    assert m["all"]["std"] == pytest.approx(0.0) and m["all"]["n"] == 2
    assert m["mean_forgetting"]["mean"] == pytest.approx(0.2) and m["bwt"]["mean"] == pytest.approx(-0.2)
    j = agg["trainers"]["J"]
    assert j["all"]["mean"] == pytest.approx(0.8) and j["old"]["n"] == 0 and math.isnan(j["old"]["mean"])
    md = continual.seeds_markdown(agg)
    assert "| M | 0.700 +- 0.141 | 0.700 +- 0.141 | 0.700 +- 0.000 | 0.200 +- 0.141 | -0.200 +- 0.141 |" in md
    assert "| J (joint, upper bound) | n/a | 0.800 +- 0.141 |" in md
    assert "seed 1: 2.0 min" in md


def test_one_seed_has_zero_spread():
    agg = continual.aggregate_seeds({3: _summary(0.5, 0.5, 0.5, 0.0, 0.0, 0.9)}, {3: 1.0})
    assert agg["trainers"]["M"]["new"] == {"mean": 0.5, "std": 0.0, "n": 1}


def test_incremental_lr_reads_nnunet_pseudo_dice_lines():
    import incremental_lr
    line = "2026-12-01 15:16:46.110700: Pseudo dice [np.float32(nan), np.float32(nan), np.float32(0.1854)] \n"
    values = incremental_lr.parse_pseudo_dice(line)
    assert math.isnan(values[0]) and math.isnan(values[1]) and values[2] == pytest.approx(0.1854)
    assert incremental_lr.parse_pseudo_dice("Pseudo dice [0.5, 0.25]") == [0.5, 0.25]
    assert incremental_lr.parse_pseudo_dice("2026-12-01: train_loss -0.5") is None

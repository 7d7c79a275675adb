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


def _two_trainers(old_a, old_b):
    """Seeds in which trainers A and B end with the given old-class Dice (new = all = 0.5 for both)."""
    return {seed: {"mean_dice": {"A": {"1": {"old": a, "new": 0.5, "all": 0.5}},
                                 "B": {"1": {"old": b, "new": 0.5, "all": 0.5}},
                                 "J": {"0": {"old": None, "new": 0.9, "all": 0.9}}},
                   "joint_trainer": "J", "at_a_glance": {"A": {"old_kept": a / 0.9}, "B": {"old_kept": b / 0.9}}}
            for seed, (a, b) in enumerate(zip(old_a, old_b))}


def test_paired_differences_by_seed_against_the_spread():
    # A is 0.02 above B in every seed while both move by 0.1 from seed to seed: the paired difference is
    # +0.02 +- 0 [3/3] although the spread (0.1) swamps it in the unpaired means
    agg = continual.aggregate_seeds(_two_trainers([0.7, 0.8, 0.9], [0.68, 0.78, 0.88]), {0: 1.0, 1: 1.0, 2: None})
    d = continual.paired_differences(agg, "A")
    assert set(d) == {"B"}  # neither A itself nor the joint model
    assert d["B"]["old"]["mean"] == pytest.approx(0.02) and d["B"]["old"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert d["B"]["old"]["higher"] == 3 and d["B"]["old"]["n"] == 3
    assert d["B"]["old"]["spread"] == pytest.approx(0.1)
    assert d["B"]["new"]["mean"] == pytest.approx(0.0) and d["B"]["new"]["higher"] == 0
    assert agg["trainers"]["A"]["old_kept"]["mean"] == pytest.approx(0.8 / 0.9)
    md = continual.seeds_markdown(agg, "A")
    assert "| B | +0.020 +- 0.000 [3/3] (0.100) |" in md
    assert "seed 2: not recorded" in md
    assert continual.paired_differences(agg, "missing") == {}
    assert "paired by seed" not in continual.seeds_markdown(agg)


def test_aggregate_only_reads_finished_seeds(tmp_path, capsys):
    import json
    for seed, summary in _two_trainers([0.7, 0.8], [0.6, 0.9]).items():
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "seeds_summary.json").write_text(json.dumps({"wall_s": {"0": 120.0}}))
    result = continual.main(["--output", str(tmp_path), "--seeds", "0", "1", "--aggregate-only", "--compare", "A"])
    assert result["trainers"]["A"]["old"]["mean"] == pytest.approx(0.75) and result["wall_s"] == {0: 120.0, 1: None}
    assert "| B | +0.000 +- 0.141 [1/2]" in (tmp_path / "seeds_table.md").read_text()
    with pytest.raises(SystemExit) as e:
        continual.main(["--output", str(tmp_path), "--seeds", "5", "--aggregate-only"])
    assert e.value.code != 0 and "seed_5" in capsys.readouterr().err

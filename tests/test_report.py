"""Tests of the continual evaluation report (CSV, JSON, Markdown, plot)."""
import json
import math
import os

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.evaluation import report

NAN = float("nan")
NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "aorta"}
CPS = [[1, 2], [3]]
# per (trainer, step, class): Dice of cases c0, c1
DICE = {
    ("FT", 0, 1): [0.8, 1.0], ("FT", 0, 2): [0.6, NAN],
    ("FT", 1, 1): [0.2, 0.4], ("FT", 1, 2): [0.1, 0.1], ("FT", 1, 3): [0.9, 0.7],
    ("Joint", 0, 1): [0.9, 0.9], ("Joint", 0, 2): [0.8, 0.8],
    ("Joint", 1, 1): [0.9, 0.9], ("Joint", 1, 2): [0.8, 0.8], ("Joint", 1, 3): [0.7, 0.7],
}


def rows():
    out = []
    for (t, s, c), vals in DICE.items():
        for i, v in enumerate(vals):
            out.append({"step": s, "trainer": t, "case": f"c{i}", "class": NAMES[c], "metric": "Dice", "value": v})
            out.append({"step": s, "trainer": t, "case": f"c{i}", "class": NAMES[c], "metric": "IoU",
                        "value": v / (2 - v) if not math.isnan(v) else NAN})
    return out


def test_write_report_files_and_content(tmp_path):
    md = report.write_report(rows(), NAMES, CPS, str(tmp_path), joint_trainer="Joint")
    for name in ("scores.csv", "summary.json", "report.md", "dice_per_class.png"):
        assert os.path.isfile(tmp_path / name), name
    with open(tmp_path / "dice_per_class.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text() == md

    # FT step 0: old n/a, new = mean(0.9, 0.6); step 1: old = mean(0.3, 0.1), new 0.8, all mean(0.3, 0.1, 0.8)
    assert "| FT | 0 | n/a | 0.750 | 0.750 |" in md
    assert "| FT | 1 | 0.200 | 0.800 | 0.400 |" in md
    assert "| Joint (joint, upper bound) | 1 | 0.850 | 0.700 | 0.800 |" in md
    # per-class table: FT step 1 liver 0.3, spleen 0.1, aorta 0.8; aorta empty at step 0
    assert "| FT | 1 | 0.300 | 0.100 | 0.800 |" in md
    assert "| FT | 0 | 0.900 | 0.600 |  |" in md
    # forgetting FT: liver 0.9-0.3=0.6, spleen 0.6-0.1=0.5; BWT = -(0.6+0.5)/2
    assert "| FT | 1 | -0.550 | 0.550 | 0.600 | 0.500 |" in md
    assert "| Joint (joint, upper bound) | 1 | 0.000 | 0.000 | 0.000 | 0.000 |" in md

    js = json.load(open(tmp_path / "summary.json"))
    assert js["labels"] == {"liver": 1, "spleen": 2, "aorta": 3}
    assert js["bwt"]["FT"] == pytest.approx(-0.55)
    assert js["forgetting"]["FT"] == {"liver": pytest.approx(0.6), "spleen": pytest.approx(0.5)}
    assert js["mean_dice"]["FT"]["0"]["old"] is None  # NaN written as null
    assert js["per_class_dice"]["Joint"]["1"]["aorta"] == pytest.approx(0.7)

    back = report.read_long_csv(str(tmp_path / "scores.csv"))
    assert len(back) == len(rows())
    assert list(back[0]) == list(report.CSV_COLUMNS)
    nan_rows = [r for r in back if r["trainer"] == "FT" and r["step"] == 0 and r["class"] == "spleen"
                and r["metric"] == "Dice" and r["case"] == "c1"]
    assert len(nan_rows) == 1 and math.isnan(nan_rows[0]["value"])


def test_trainer_order_and_print(tmp_path, capsys):
    md = report.write_report(rows(), NAMES, CPS, str(tmp_path), trainers=["Joint", "FT"], print_table=True)
    assert md.index("| Joint | 0 |") < md.index("| FT | 0 |")
    assert "## Mean Dice per step" in capsys.readouterr().out


def test_bad_input_raises(tmp_path):
    bad = rows() + [{"step": 0, "trainer": "FT", "case": "c0", "class": "heart", "metric": "Dice", "value": 1.0}]
    with pytest.raises(CIMISError, match="heart"):
        report.write_report(bad, NAMES, CPS, str(tmp_path))
    only_iou = [r for r in rows() if r["metric"] == "IoU"]
    with pytest.raises(CIMISError, match="no Dice"):
        report.write_report(only_iou, NAMES, CPS, str(tmp_path))


# ---- "at a glance" lines, the bounds warning and never-learned classes (synthetic scores, no training) ----
NAMES3 = {0: "background", 1: "liver", 2: "spleen", 3: "aorta", 4: "kidney"}
CPS3 = [[1, 2], [3], [4]]
STEP0 = {1: 0.9, 2: 0.8}
JOINT_GOOD = {s: {1: 0.9, 2: 0.9, 3: 0.8, 4: 0.8} for s in range(3)}
FT_GOOD = {0: STEP0, 1: {1: 0.1, 2: 0.0, 3: 0.7}, 2: {1: 0.0, 2: 0.0, 3: 0.1, 4: 0.9}}
METHOD = {0: STEP0, 1: {1: 0.85, 2: 0.75, 3: 0.6}, 2: {1: 0.8, 2: 0.7, 3: 0.5, 4: 0.5}}


def rows_of(runs):
    """runs: trainer -> step -> class -> Dice (the same Dice for two test cases)."""
    out = []
    for t, by_step in runs.items():
        for s, d in by_step.items():
            known = [c for st in CPS3[:s + 1] for c in st]
            for c in known:
                for case in ("c0", "c1"):
                    out.append({"step": s, "trainer": t, "case": case, "class": NAMES3[c], "metric": "Dice",
                                "value": d[c]})
    return out


def glance_report(tmp_path, runs, **kw):
    md = report.write_report(rows_of(runs), NAMES3, CPS3, str(tmp_path), joint_trainer="Joint",
                             ft_trainer="FT", **kw)
    return md, json.load(open(tmp_path / "summary.json"))


def test_glance_lines_trained_bounds_no_warning(tmp_path, capsys):
    md, js = glance_report(tmp_path, {"FT": FT_GOOD, "M": METHOD, "Joint": JOINT_GOOD})
    out = capsys.readouterr().out
    # by hand: M new = mean(0.6, 0.5) = 0.55; FT new = mean(0.7, 0.9) = 0.8; M old at step 2 = mean(0.8, 0.7, 0.5)
    # over joint mean(0.9, 0.9, 0.8) = 0.769; forgetting 0.1 for each of the three old classes
    m_line = ("M: new classes learned: Dice 0.550 (FT: 0.800); old classes kept: 77 % of joint; "
              "mean forgetting 0.100 (3 learned old classes)")
    # FT old = mean(0, 0, 0.1) / 0.8667 = 3.8 %; forgetting 0.9, 0.8, 0.6
    ft_line = ("FT: new classes learned: Dice 0.800 (FT: 0.800); old classes kept: 4 % of joint; "
               "mean forgetting 0.767 (3 learned old classes)")
    for line in (m_line, ft_line):
        assert f"- {line}" in md
        assert line in out
    assert md.index("## At a glance") < md.index("## Mean Dice per step")
    assert "WARNING" not in md and "WARNING" not in out
    assert "Joint: new classes" not in md  # the joint model is the reference, not a method
    assert js["bounds"]["warning"] is None
    g = js["at_a_glance"]["M"]
    assert g["new_dice"] == pytest.approx(0.55) and g["ft_new_dice"] == pytest.approx(0.8)
    assert g["old_kept"] == pytest.approx((0.8 + 0.7 + 0.5) / (0.9 + 0.9 + 0.8))
    assert g["mean_forgetting"] == pytest.approx(0.1) and g["never_learned"] == []


def test_under_trained_bounds_warn(tmp_path, capsys):
    joint_bad = {s: {1: 0.7, 2: 0.0, 3: 0.0, 4: 0.0} for s in range(3)}
    ft_bad = {0: STEP0, 1: {1: 0.0, 2: 0.0, 3: 0.0}, 2: {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.3}}
    md, js = glance_report(tmp_path, {"FT": ft_bad, "M": METHOD, "Joint": joint_bad})
    out = capsys.readouterr().out
    warning = ("WARNING: the bounds are under-trained; the comparison is not meaningful "
               "(joint model Joint: mean Dice over all classes 0.175 < 0.80; "
               "fine-tuning FT: new-class Dice 0.000 at step 1, 0.300 at step 2 (bound 0.60))")
    assert f"> **{warning}**" in md
    assert md.index(warning) < md.index("## Mean Dice per step")
    assert warning in out and "!!!!!!!!" in out
    assert js["bounds"]["warning"] == warning

    # only one bound under-trained: the warning names it alone
    md, _ = glance_report(tmp_path, {"FT": FT_GOOD, "M": METHOD, "Joint": joint_bad})
    assert "joint model Joint: mean Dice over all classes 0.175 < 0.80)" in md and "fine-tuning FT:" not in md
    md, _ = glance_report(tmp_path, {"FT": ft_bad, "M": METHOD, "Joint": JOINT_GOOD})
    assert "(fine-tuning FT: new-class Dice 0.000 at step 1, 0.300 at step 2 (bound 0.60))" in md
    # the thresholds are parameters
    md, js = glance_report(tmp_path, {"FT": ft_bad, "M": METHOD, "Joint": joint_bad}, joint_bound=0.1,
                           ft_new_bound=0.0)
    assert "WARNING" not in md and js["bounds"] == {"joint_bound": 0.1, "ft_new_bound": 0.0, "ft_trainer": "FT",
                                                     "warning": None}


def test_missing_bounds_give_a_note(tmp_path, capsys):
    md = report.write_report(rows_of({"M": METHOD}), NAMES3, CPS3, str(tmp_path), ft_trainer="FT")
    assert "note: no joint model and no fine-tuning evaluated" in md
    assert "M: new classes learned: Dice 0.550 (FT: n/a); old classes kept: n/a of joint" in md


def test_never_learned_is_not_zero_forgetting(tmp_path, capsys):
    zero = {s: {c: 0.0 for st in CPS3[:s + 1] for c in st} for s in range(3)}
    # P learns liver and spleen, never aorta (0 then 0.005 < eps) nor kidney
    partial = {0: STEP0, 1: {1: 0.7, 2: 0.7, 3: 0.0}, 2: {1: 0.5, 2: 0.6, 3: 0.005, 4: 0.0}}
    md, js = glance_report(tmp_path, {"FT": FT_GOOD, "Z": zero, "P": partial, "Joint": JOINT_GOOD})
    out = capsys.readouterr().out
    z_line = ("Z: new classes learned: Dice 0.000 (FT: 0.800); old classes kept: 0 % of joint; "
              "mean forgetting n/a (no old class was learned); never learned: 4 classes (liver, spleen, aorta, "
              "kidney)")
    assert z_line in md and z_line in out
    # forgetting table: every old class of Z reads "never learned", BWT and mean forgetting are n/a
    assert "| Z | 2 | n/a | n/a (3 never learned) | never learned | never learned | never learned |" in md
    # P: forgetting liver 0.9-0.5, spleen 0.8-0.6; aorta never learned; BWT = mean(-0.4, -0.2)
    assert "| P | 2 | -0.300 | 0.300 (1 never learned) | 0.400 | 0.200 | never learned |" in md
    assert ("mean forgetting 0.300 (2 learned old classes); never learned: 2 classes (aorta, kidney)" in md)
    assert js["never_learned"] == {"FT": [], "Z": ["liver", "spleen", "aorta", "kidney"], "P": ["aorta", "kidney"],
                                   "Joint": []}
    assert js["forgetting"]["Z"] == {"liver": None, "spleen": None, "aorta": None}
    assert js["mean_forgetting"]["Z"] is None and js["bwt"]["Z"] is None
    assert js["at_a_glance"]["Z"]["learned_old"] == 0
    # the epsilon is a parameter: at 0.001 aorta's 0.005 counts as learned (forgetting 0.0 - 0.005)
    md, js = glance_report(tmp_path, {"FT": FT_GOOD, "P": partial, "Joint": JOINT_GOOD}, never_learned_eps=0.001)
    assert js["never_learned"]["P"] == ["kidney"]
    assert js["forgetting"]["P"]["aorta"] == pytest.approx(-0.005)

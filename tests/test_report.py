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

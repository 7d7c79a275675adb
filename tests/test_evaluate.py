"""Tests of nnUNetv2_cimis_evaluate.

The plumbing test builds a real scenario (phantom -> nnUNetv2_cimis_make_scenario without preprocessing) and
fake model folders, replaces the predictor by a function that writes known segmentations, and checks the
scores computed through nnU-Net's compute_metrics_on_folder against hand-derived values.
"""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.evaluation import evaluate as ev

PLANS, CONFIG = "nnUNetPlans", "3d_fullres"


@pytest.fixture
def scenario(tmp_path, monkeypatch):
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.scenarios.make_scenario import make_scenario
    raw, pre, res = (str(tmp_path / n) for n in ("raw", "pre", "res"))
    for var, p in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        os.makedirs(p)
        monkeypatch.setenv(var, p)
    write_abdominal_phantom(raw, 950, 8, shape=(16, 16, 16), organs=["liver", "spleen", "aorta"])
    summary = make_scenario("950", "2-1", [951, 952], 953, test_fraction=0.25, seed=0, preprocess=False)
    return raw, res, summary


def _fake_model(res, dataset, trainer):
    d = os.path.join(res, dataset, f"{trainer}__{PLANS}__{CONFIG}", "fold_0")
    os.makedirs(d)
    open(os.path.join(d, "checkpoint_final.pth"), "w").close()
    return os.path.dirname(d)


def test_evaluate_scenario_with_fake_predictions(scenario, tmp_path, monkeypatch):
    raw, res, summary = scenario
    step0, step1 = summary["step_datasets"]
    joint = summary["joint_dataset"]
    test_set = ev.load_test_set(os.path.join(raw, step0, "test_set.json"))  # paths resolved to absolute ones
    labels_of_case = {c: e["label"] for c, e in test_set["cases"].items()}
    # step 0 model (trained by the teacher trainer of step 1: nnUNetTrainerFT); trainer A at step 1; joint.
    # Trainer B has no step-1 model.
    m0 = _fake_model(res, step0, "nnUNetTrainerFT")
    m1 = _fake_model(res, step1, "A")
    mj = _fake_model(res, joint, "nnUNetTrainerJoint")
    calls = []

    def fake_predict(model_dir, fold, images, outputs, use_mirroring=False, device=None, num_processes=1,
                     checkpoint_name="checkpoint_final.pth"):
        calls.append(model_dir)
        for out in outputs:
            ref = sitk.ReadImage(labels_of_case[os.path.basename(out)])
            arr = sitk.GetArrayFromImage(ref)
            if model_dir == m0:
                arr[arr > 2] = 0  # knows liver, spleen: perfect on them
            elif model_dir == m1:
                arr[arr == 1] = 0  # forgot the liver, perfect on spleen and aorta
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(ref)
            sitk.WriteImage(img, out + ".nii.gz")

    monkeypatch.setattr(ev, "predict_cases", fake_predict)
    out_dir = str(tmp_path / "eval")
    with pytest.warns(UserWarning, match="B__nnUNetPlans"):
        result = ev.evaluate_scenario("952", CONFIG, PLANS, 0, ["A", "B"], out_dir, num_processes=0)
    assert sorted(calls) == sorted([m0, m1, mj])  # the shared step-0 model is predicted once
    for f in ("scores.csv", "summary.json", "report.md", "dice_per_class.png"):
        assert os.path.isfile(os.path.join(out_dir, f))
    md = result["markdown"]
    # A: step 0 liver 1 spleen 1; step 1 liver 0, spleen 1, aorta 1 -> old 0.5, new 1, all 2/3
    assert "| A | 0 | n/a | 1.000 | 1.000 |" in md
    assert "| A | 1 | 0.500 | 1.000 | 0.667 |" in md
    assert "| B | 0 | n/a | 1.000 | 1.000 |" in md and "| B | 1 |" not in md
    assert "| nnUNetTrainerJoint (joint, upper bound) | 1 | 1.000 | 1.000 | 1.000 |" in md
    assert result["forgetting"]["A"] == {"liver": 1.0, "spleen": 0.0}
    assert result["bwt"]["A"] == -0.5 and result["bwt"]["nnUNetTrainerJoint"] == 0.0
    assert result["bwt"]["B"] is None  # only step 0 evaluated
    assert result["evaluated"] == {"A": [0, 1], "B": [0], "nnUNetTrainerJoint": [0, 1]}
    assert len(result["missing_models"]) == 1 and "/B__" in result["missing_models"][0]
    # the bounds check: no fine-tuning run here (a note), the joint model (Dice 1) above the default bound
    assert "note: no fine-tuning evaluated" in md and "WARNING" not in md
    assert "- A: new classes learned: Dice 1.000 (FT: n/a); old classes kept: 50 % of joint" in md
    with pytest.warns(UserWarning, match="B__nnUNetPlans"):
        strict = ev.evaluate_scenario("952", CONFIG, PLANS, 0, ["A", "B"], str(tmp_path / "eval2"), num_processes=0,
                                      joint_bound=1.01)
    assert ("WARNING: the bounds are under-trained; the comparison is not meaningful (joint model "
            "nnUNetTrainerJoint: mean Dice over all classes 1.000 < 1.01)") in strict["markdown"]
    assert strict["bounds"]["joint_bound"] == 1.01
    a = ev.build_parser().parse_args(["-d", "1", "-o", "x", "--joint-bound", "0.5", "--ft-bound", "0.4"])
    assert (a.joint_bound, a.ft_bound) == (0.5, 0.4)
    # long CSV: (A: 2 steps with 2 + 3 classes, B: 2 classes, joint: 2 + 3) x 2 cases x 2 metrics
    n_cases = len(test_set["cases"])
    with open(os.path.join(out_dir, "scores.csv")) as f:
        assert len(f.readlines()) - 1 == (5 + 2 + 5) * n_cases * 2


def test_no_models_is_an_error(scenario, tmp_path):
    with pytest.raises(CIMISError, match="none of the models"):
        ev.evaluate_scenario("951", CONFIG, PLANS, 0, ["A"], str(tmp_path / "eval"))


def test_cli_errors(scenario, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["-d", "999", "-tr", "A", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "999" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the source dataset has no step metadata
        ev.main(["-d", "950", "-tr", "A", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "step metadata" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["-d", "951", "-tr", "nnUNetTrainerJoint", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "joint trainer" in capsys.readouterr().err


def test_score_folder_in_process_matches_compute_metrics_on_folder(tmp_path):
    """num_processes=0 (in-process) and 1 (nnU-Net's compute_metrics_on_folder) give the same summary."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        r = rng.integers(0, 3, (6, 7, 8)).astype(np.uint8)
        p = r.copy()
        p[:2] = 0
        for arr, d in ((r, ref), (p, pred)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(d / f"c{i}.nii.gz"))
    # Dice by hand for label 1 of case 0
    r0 = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "c0.nii.gz")))
    p0 = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "c0.nii.gz")))
    tp = np.sum((r0 == 1) & (p0 == 1))
    dice = 2 * tp / (np.sum(r0 == 1) + np.sum(p0 == 1))
    a = ev.score_folder(str(ref), str(pred), ".nii.gz", [1, 2, 3], str(ref / "c0.nii.gz"), num_processes=0)
    a_json = json.load(open(pred / "summary.json"))
    b = ev.score_folder(str(ref), str(pred), ".nii.gz", [1, 2, 3], str(ref / "c0.nii.gz"), num_processes=1)
    b_json = json.load(open(pred / "summary.json"))
    assert a["metric_per_case"][0]["metrics"][1]["Dice"] == pytest.approx(dice)
    assert a_json == b_json
    assert math.isnan(a["metric_per_case"][0]["metrics"][3]["Dice"])  # absent in both


@pytest.mark.e2e
def test_evaluate_tiny_scenario_end_to_end(tiny_scenario, tmp_path):
    """Real models (2 training iterations each) through nnU-Net's predictor and evaluation: the in-process path
    (num_processes=0) and the command with worker processes (-np 1) give the same scores."""
    import warnings

    from e2e_utils import CONFIGURATION, PLANS as TINY_PLANS, model_folder, train
    env, steps, joint = tiny_scenario["env"], tiny_scenario["step_datasets"], tiny_scenario["joint_dataset"]
    for dataset, trainer in ((steps[1], "nnUNetTrainerFT"), (joint, "nnUNetTrainerJoint")):
        if not os.path.isfile(os.path.join(model_folder(env, dataset, trainer), "checkpoint_final.pth")):
            train(dataset, trainer, env)
    step2_missing = not os.path.isfile(os.path.join(model_folder(env, steps[2], "nnUNetTrainerFT"),
                                                    "checkpoint_final.pth"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ev.evaluate_scenario(steps[2], CONFIGURATION, TINY_PLANS, 0, ["nnUNetTrainerFT"], str(tmp_path / "a"),
                                 num_processes=0, use_mirroring=False)
    assert a["evaluated"]["nnUNetTrainerJoint"] == [0, 1, 2]
    assert a["evaluated"]["nnUNetTrainerFT"][:2] == [0, 1]
    if step2_missing:
        assert any("Step2/nnUNetTrainerFT__" in str(w.message) for w in caught)
        assert len(a["missing_models"]) == 1
    labels = json.load(open(os.path.join(tiny_scenario["env"]["nnUNet_raw"], steps[0], "test_set.json")))["labels"]
    assert set(a["per_class_dice"]["nnUNetTrainerJoint"]["2"]) == set(labels) - {"background"}
    for v in a["per_class_dice"]["nnUNetTrainerFT"]["1"].values():
        assert v is None or 0.0 <= v <= 1.0
    # the step-0 rows of FT come from the step-0 model, predicted into predictions/<step0>__nnUNetTrainerFT
    pred_dir = tmp_path / "a" / "predictions" / f"{steps[0]}__nnUNetTrainerFT"
    assert len([f for f in os.listdir(pred_dir) if f.endswith(".nii.gz")]) == len(a["test_cases"])
    # the command, with worker processes: same scores
    ev.main(["-d", steps[0], "-c", CONFIGURATION, "-p", TINY_PLANS, "-f", "0", "-tr", "nnUNetTrainerFT",
             "-o", str(tmp_path / "b"), "-np", "1", "--disable_tta"])
    b = json.load(open(tmp_path / "b" / "summary.json"))
    assert b["per_class_dice"] == a["per_class_dice"]
    assert b["bwt"] == a["bwt"]


def test_score_existing_predictions(scenario, tmp_path):
    """--predictions: a folder is scored as it is (nothing predicted), on the classes of the step of -d, with Dice,
    IoU, NSD and HD95; predictions written in source values (nnUNetv2_cimis_predict --labels source) score the same
    after mapping back."""
    raw, res, summary = scenario
    step0, step1 = summary["step_datasets"]
    test_set = ev.load_test_set(os.path.join(raw, step0, "test_set.json"))
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for case, entry in test_set["cases"].items():
        ref = sitk.ReadImage(entry["label"])
        arr = sitk.GetArrayFromImage(ref)
        arr[arr == 2] = 0  # the spleen is missed everywhere
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(pred_dir / f"{case}.nii.gz"))
    result = ev.score_predictions("951", str(pred_dir), str(tmp_path / "scores"), nsd_tolerance=["1", "liver=3"])
    assert result["step"] == 0 and set(result["mean"]) == {1, 2}  # step 0 learned liver and spleen only
    liver, spleen = result["mean"][1], result["mean"][2]
    assert liver["Dice"] == 1.0 and liver["NSD"] == 1.0 and liver["HD95"] == 0.0
    assert spleen["Dice"] == 0.0 and spleen["NSD"] == 0.0 and math.isnan(spleen["HD95"])
    assert result["nsd_tolerance_mm"] == {"1": 3.0, "2": 1.0}
    written = json.load(open(tmp_path / "scores" / "summary.json"))
    assert written["mean"]["2"]["HD95"] is None and written["foreground_mean"]["Dice"] == 0.5
    assert "| spleen | 1 | 0.000 | 0.000 | 0.000 | n/a |" in result["markdown"]
    # the same folder in source values (here the phantom's order equals the scenario's) through the command
    from nnunetv2_cimis.submission.predict import predict_submission
    predict_submission(str(pred_dir), str(tmp_path / "src"), os.path.join(raw, step1), labels="source",
                       segmentations=True)
    ev.main(["-d", step1, "--predictions", str(tmp_path / "src"), "--labels", "source"])
    by_source = json.load(open(tmp_path / "src" / "summary.json"))
    assert by_source["step"] == 1 and by_source["mean"]["1"]["Dice"] == 1.0 and by_source["mean"]["3"]["Dice"] == 1.0
    # a test case without prediction is named
    os.remove(pred_dir / f"{sorted(test_set['cases'])[0]}.nii.gz")
    with pytest.raises(CIMISError, match="no prediction"):
        ev.score_predictions("951", str(pred_dir))

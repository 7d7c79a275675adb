"""End-to-end: the tiny scenario's trained step-0 model (tests/conftest.py) through the submission path.

1. docker/inference.py (what the container runs; no Docker here) predicts FLARE22-named inputs with nnU-Net's
   predictor and writes FLARE22 values and names; nnUNetv2_cimis_evaluate --predictions scores that folder with
   NSD and HD95 without predicting again.
2. nnUNetv2_cimis_export -> nnUNetv2_install_pretrained_model_from_zip into fresh nnU-Net folders (the training
   data is gone) -> nnUNetv2_cimis_add_classes from the installed model -> one training iteration of PGCD, which
   needs the teacher's step memory (it cannot be recomputed without the training data).
"""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from e2e_utils import CONFIGURATION, PLANS, model_folder

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, env, **kw):
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _exe(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def test_inference_script_then_score_with_nsd(tiny_scenario, tmp_path):
    from nnunetv2_cimis.evaluation.evaluate import load_test_set, score_predictions
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    test_set = load_test_set(os.path.join(env["nnUNet_raw"], steps[0], "test_set.json"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case, entry in test_set["cases"].items():  # FLARE22's input naming: <case>_0000.nii.gz
        os.symlink(entry["images"][0], inputs / f"{case}_0000.nii.gz")
    outputs = tmp_path / "outputs"
    model = os.path.dirname(model_folder(env, steps[0], "nnUNetTrainerFT"))
    run_env = dict({**os.environ, **env}, CIMIS_MODEL=model, CIMIS_FOLDS="0", CIMIS_CHALLENGE="flare22",
                   CIMIS_DEVICE="cpu", CIMIS_DISABLE_TTA="1", CIMIS_NPP="0", CIMIS_NPS="0")
    proc = _run([sys.executable, os.path.join(REPO, "docker", "inference.py"), "-i", inputs, "-o", outputs], run_env)
    assert "labels: flare22; 1->1, 2->11" in proc.stdout  # phantom liver -> FLARE22 liver 1, stomach -> 11
    cases = sorted(test_set["cases"])
    assert sorted(os.listdir(outputs)) == [f"{c}.nii.gz" for c in cases]  # predictions only, FLARE22 names
    for c in cases:
        out = sitk.ReadImage(str(outputs / f"{c}.nii.gz"))
        ref = sitk.ReadImage(test_set["cases"][c]["label"])
        assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= {0, 1, 11}
        assert out.GetSize() == ref.GetSize() and out.GetSpacing() == pytest.approx(ref.GetSpacing())
    # score the folder as it is: FLARE22 values mapped back to the scenario's, classes of step 0
    result = score_predictions(steps[0], str(outputs), str(tmp_path / "scores"), labels="flare22",
                               nsd_tolerance=["2", "liver=3"])
    assert sorted(result["mean"]) == [1, 2] and result["nsd_tolerance_mm"] == {"1": 3.0, "2": 2.0}
    c0 = cases[0]
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / f"{c0}.nii.gz"))) == 1
    ref = sitk.GetArrayFromImage(sitk.ReadImage(test_set["cases"][c0]["label"])) == 1
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum()) if pred.sum() + ref.sum() else float("nan")
    liver = result["metric_per_case"][0]["metrics"][1]
    assert liver["Dice"] == pytest.approx(dice)
    for m in result["metric_per_case"]:
        for v in m["metrics"].values():
            assert np.isnan(v["NSD"]) or 0.0 <= v["NSD"] <= 1.0
            assert np.isnan(v["HD95"]) or v["HD95"] >= 0.0
    assert os.path.isfile(tmp_path / "scores" / "summary.json")


_ONE_ITERATION = """
import os, sys
sys.path.insert(0, {tests!r})
from e2e_utils import build_trainer
from nnunetv2_cimis.nnunet_trainers.pgcd_dapd import nnUNetTrainerPGCD
trainer = build_trainer({dataset!r}, nnUNetTrainerPGCD)
trainer.on_train_start()
assert trainer.teacher_memory is not None, "no teacher step memory"
trainer.on_train_epoch_start()
loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
print("one iteration, loss", float(loss))
"""


def test_export_install_extend(tiny_scenario, tmp_path):
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    zip_file = tmp_path / "model.zip"
    proc = _run([_exe("nnUNetv2_cimis_export"), "-d", steps[0], "-o", zip_file, "-c", CONFIGURATION, "-tr",
                 "nnUNetTrainerFT", "-p", PLANS, "-f", "0"], {**os.environ, **env})
    assert "step_memory.pth" in proc.stdout
    model_rel = f"{steps[0]}/nnUNetTrainerFT__{PLANS}__{CONFIGURATION}"
    names = zipfile.ZipFile(zip_file).namelist()
    for f in ("fold_0/checkpoint_final.pth", "fold_0/step_memory.pth", "plans.json", "dataset.json"):
        assert f"{model_rel}/{f}" in names
    # fresh nnU-Net folders: nothing of the scenario, its data or its results
    fresh = {f"nnUNet_{k}": str(tmp_path / k) for k in ("raw", "preprocessed", "results")}
    for p in fresh.values():
        os.makedirs(p)
    fresh_env = {**os.environ, **env, **fresh}
    _run([_exe("nnUNetv2_install_pretrained_model_from_zip"), zip_file], fresh_env)
    installed = os.path.join(fresh["nnUNet_results"], model_rel)
    assert os.path.isfile(os.path.join(installed, "fold_0", "step_memory.pth"))
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    write_abdominal_phantom(fresh["nnUNet_raw"], 950, 2, shape=(32, 32, 32), seed=7, organs=["aorta", "pancreas"],
                            dataset_name="NewOrgans")
    proc = _run([_exe("nnUNetv2_cimis_add_classes"), "-m", installed, "-d", 950, "-o", 951, "-device", "cpu"],
                fresh_env)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["teacher_step_memory"] == "present" and summary["teacher"].startswith(fresh["nnUNet_results"])
    with open(os.path.join(fresh["nnUNet_raw"], summary["dataset"], "dataset.json")) as f:
        sources = json.load(f)["cimis"]["source_labels"]
    assert sources["3"] == {"dataset": "Dataset950_NewOrgans", "name": "aorta", "value": 1}
    proc = _run([sys.executable, "-c", _ONE_ITERATION.format(tests=os.path.dirname(__file__),
                                                              dataset=summary["dataset"])],
                dict(fresh_env, nnUNet_cimis_iterations="1"))
    assert "one iteration, loss" in proc.stdout

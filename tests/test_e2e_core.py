"""End-to-end: the real nnU-Net CLIs on a tiny phantom scenario (plan, preprocess, train, predict, evaluate),
and the errors a user can cause, each a clear message without a traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

from e2e_utils import CONFIGURATION, PLANS, model_folder, train

pytestmark = pytest.mark.e2e


def _cli(name, *args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return subprocess.run([exe, *map(str, args)], env=dict(os.environ, **(env or {})), capture_output=True, text=True)


def _assert_clean_error(proc, *fragments):
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    for f in fragments:
        assert f in out, out[-3000:]


def test_scenario_datasets(tiny_scenario):
    raw = tiny_scenario["env"]["nnUNet_raw"]
    steps = tiny_scenario["step_datasets"]
    seen_cases = set()
    for t, name in enumerate(steps):
        with open(os.path.join(raw, name, "dataset.json")) as f:
            ds = json.load(f)
        assert ds["cimis"]["step"] == t
        assert max(ds["labels"].values()) == 2 * (t + 1)  # "2-2-2": one global label space
        cases = set(ds["dataset"])
        assert not cases & seen_cases  # disjoint patients
        seen_cases |= cases
        for case, files in ds["dataset"].items():
            image = files["images"][0]  # referenced (not copied), relative to the dataset folder as nnU-Net resolves it
            assert not os.path.isabs(image) and os.path.isfile(os.path.join(raw, name, image))
            import SimpleITK as sitk
            seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, name, files["label"])))
            assert set(seg.ravel().tolist()) <= {0, 2 * t + 1, 2 * t + 2}  # only the step's new classes
    with open(tiny_scenario["env"]["nnUNet_preprocessed"] + f"/{steps[1]}/{PLANS}.json") as f:
        assert json.load(f)["dataset_name"] == steps[1]
    with open(os.path.join(raw, steps[0], "test_set.json")) as f:
        test = json.load(f)
    assert not set(test["cases"]) & seen_cases


def test_trainer_errors(tiny_scenario):
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    # step 2 before step 1: the teacher is missing, and the message says what to train
    proc = _cli("nnUNetv2_train", steps[2], CONFIGURATION, 0, "-tr", "nnUNetTrainerFT", "-p", PLANS, "-device", "cpu")
    _assert_clean_error(proc, "teacher checkpoint", f"nnUNetv2_train {steps[1]}")
    # a dataset without step metadata (the joint dataset)
    proc = _cli("nnUNetv2_train", tiny_scenario["joint_dataset"], CONFIGURATION, 0, "-tr", "nnUNetTrainerFT", "-p",
                PLANS, "-device", "cpu")
    _assert_clean_error(proc, "no step metadata", "nnUNetv2_cimis_make_scenario")
    # a teacher with a different number of classes (step 0's model used as teacher of step 2 via the override)
    wrong = os.path.join(model_folder(env, steps[0], "nnUNetTrainerFT"), "checkpoint_final.pth")
    proc = _cli("nnUNetv2_train", steps[2], CONFIGURATION, 0, "-tr", "nnUNetTrainerFT", "-p", PLANS, "-device", "cpu",
                env={"nnUNet_cimis_teacher": wrong})
    _assert_clean_error(proc, "belongs to another step")


def test_incremental_step_train_resume_predict_evaluate(tiny_scenario, tmp_path):
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    train(steps[1], "nnUNetTrainerFT", env)
    folder = model_folder(env, steps[1], "nnUNetTrainerFT")
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["cimis_state"]["step"] == 1
    head = [v for k, v in ckpt["network_weights"].items() if "seg_layers" in k and k.endswith("weight")]
    assert all(w.shape[0] == 5 for w in head)  # background + 4 classes
    from nnunetv2_cimis.memory.step_memory import StepMemory
    memory = StepMemory.load(os.path.join(folder, "step_memory.pth"))
    step0_memory = StepMemory.load(os.path.join(model_folder(env, steps[0], "nnUNetTrainerFT"), "step_memory.pth"))
    assert memory.prototypes.shape[0] == 5
    for v in (1, 2):  # old-class prototypes carried forward from step 0
        if step0_memory.has_prototype(v):
            assert torch.equal(memory.prototypes[v], step0_memory.prototypes[v])
    assert memory.norm_stats and memory.label_bank
    # --c continues from the final checkpoint for one more epoch
    train(steps[1], "nnUNetTrainerFT", dict(env, nnUNet_cimis_epochs="2"), args=["--c"])
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2
    # nnUNetv2_predict works on it as on any nnU-Net model
    with open(os.path.join(env["nnUNet_raw"], steps[0], "test_set.json")) as f:
        test = json.load(f)
    case, files = sorted(test["cases"].items())[0]
    inp = tmp_path / "in"
    inp.mkdir()  # test_set.json refers to files relative to its own folder
    os.symlink(os.path.join(env["nnUNet_raw"], steps[0], files["images"][0]), inp / f"{case}_0000.nii.gz")
    out = tmp_path / "out"
    proc = _cli("nnUNetv2_predict", "-i", inp, "-o", out, "-d", steps[1], "-c", CONFIGURATION, "-f", 0, "-tr",
                "nnUNetTrainerFT", "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import SimpleITK as sitk
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    assert pred.max() <= 4
    # continual evaluation through nnU-Net's predictor and evaluation
    from nnunetv2_cimis.evaluation.evaluate import evaluate_scenario
    result = evaluate_scenario(steps[1], CONFIGURATION, PLANS, 0, ["nnUNetTrainerFT"], str(tmp_path / "eval"),
                               joint_trainer=None, num_processes=0, use_mirroring=False)
    for name in ("scores.csv", "summary.json", "report.md", "dice_per_class.png"):
        assert os.path.isfile(tmp_path / "eval" / name)
    assert "nnUNetTrainerFT" in result["markdown"]


def test_add_classes_extends_a_trained_model(tiny_scenario, tmp_path):
    env, steps = tiny_scenario["env"], tiny_scenario["step_datasets"]
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    write_abdominal_phantom(env["nnUNet_raw"], 950, 4, seed=7, organs=["aorta", "pancreas"], dataset_name="NewOrgans")
    model = os.path.dirname(model_folder(env, steps[0], "nnUNetTrainerFT"))
    proc = _cli("nnUNetv2_cimis_add_classes", "-m", model, "-d", 950, "-o", 951)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    with open(os.path.join(env["nnUNet_raw"], steps[0], "dataset.json")) as f:
        old = json.load(f)["labels"]
    assert summary["labels"] == dict(old, aorta=3, pancreas=4)
    assert summary["dataset"] == "Dataset951_AbdominalPhantomPlusNewOrgansStep1"  # named after the chain it extends
    with open(os.path.join(env["nnUNet_raw"], summary["dataset"], "dataset.json")) as f:
        assert json.load(f)["cimis"]["scenario"] == "AbdominalPhantom+NewOrgans"
    train(summary["dataset"], "nnUNetTrainerFT", env)
    assert os.path.isfile(os.path.join(model_folder(env, summary["dataset"], "nnUNetTrainerFT"), "step_memory.pth"))
    # overlapping labels are refused, and nothing is left behind
    proc = _cli("nnUNetv2_cimis_add_classes", "-m", model, "-d", steps[0], "-o", 952)
    _assert_clean_error(proc, "already knows")
    assert not [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith("Dataset952")]


def test_make_scenario_errors(tiny_scenario, tmp_path):
    env = tiny_scenario["env"]
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 999, "-s", "2-2", "--ids", 960, 961),
                        "Unknown dataset")
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 900, "-s", "liver;pizza", "--ids", 960, 961),
                        "'pizza'")
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 900, "-s", "liver;liver", "--ids", 960, 961),
                        "twice")
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 900, "-s", "5-5", "--ids", 960, 961),
                        "needs 10 classes")
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 900, "-s", "1-1", "--ids", 901, 961),
                        "already used")
    _assert_clean_error(_cli("nnUNetv2_cimis_make_scenario", "-d", 900, "-s", "1-1-1-1-1-1", "--ids",
                             *range(960, 966)), "at least 2 cases")
    # a corrupt image: clear message naming the file, nothing half-written
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    folder = write_abdominal_phantom(env["nnUNet_raw"], 970, 6, seed=1, dataset_name="Corrupt")
    bad = os.path.join(folder, "imagesTr", sorted(os.listdir(os.path.join(folder, "imagesTr")))[2])
    with open(bad, "wb") as f:
        f.write(b"not a nifti file")
    proc = _cli("nnUNetv2_cimis_make_scenario", "-d", 970, "-s", "1-1", "--ids", 971, 972, "--no-preprocess")
    _assert_clean_error(proc, os.path.basename(bad))
    assert not [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith(("Dataset971", "Dataset972", ".Dataset97"))]

"""CPU users and helper commands (issue 12 points 8 and 9): --features-per-stage checked before planning and
fitted to the planned stages, names of add_classes datasets, evaluate's missing-model warning printed once,
-device of add_classes / step_memory (GPU when present, a clear error when asked for but absent), progress
of the step-memory pass."""
import json
import os

import pytest
import SimpleITK as sitk
import torch

from nnunetv2_cimis.command_options import resolve_device
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.scenarios import make_scenario as ms


# ------------------------------------------------------------------------------------- --features-per-stage
def _plans_file(tmp_path, n_stages, configuration="3d_fullres"):
    plans = {"configurations": {configuration: {"architecture": {"arch_kwargs": {
        "n_stages": n_stages, "features_per_stage": [32 * 2 ** i for i in range(n_stages)]}}}}}
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    return str(path)


def _written_features(path, configuration="3d_fullres"):
    with open(path) as f:
        return json.load(f)["configurations"][configuration]["architecture"]["arch_kwargs"]["features_per_stage"]


def test_short_feature_list_is_extended_to_the_planned_stages(tmp_path, capsys):
    path = _plans_file(tmp_path, 6)
    assert ms.shrink_network(path, "3d_fullres", [8, 16, 32, 64]) == [8, 16, 32, 64, 64, 64]
    assert _written_features(path) == [8, 16, 32, 64, 64, 64]
    assert "6 stages" in capsys.readouterr().err
    # a longer list is cut, an exact one kept
    assert ms.shrink_network(path, "3d_fullres", [4, 8, 16, 32, 64, 128, 256]) == [4, 8, 16, 32, 64, 128]
    assert ms.fit_features_to_stages([8, 16], 2) == [8, 16]
    assert ms.fit_features_to_stages([8], 4) == [8, 8, 8, 8]


@pytest.mark.parametrize("bad", [[], [8, 0, 16], [8, -4]])
def test_bad_feature_list_is_refused_before_any_work(bad, tmp_path, monkeypatch):
    """make_scenario checks the values first: no source is read, nothing is planned or written."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))  # does not exist: reading a source would fail
    with pytest.raises(CIMISError, match="--features-per-stage takes positive integers"):
        ms.make_scenario("999", "2-2", [960, 961], features_per_stage=bad)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "many", float("nan"), float("inf")])
def test_bad_fingerprint_samples_are_refused_before_any_work(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(CIMISError, match="--fingerprint-samples takes a positive whole number"):
        ms.make_scenario("999", "2-2", [960, 961], fingerprint_samples=bad)
    assert not (tmp_path / "raw").exists()
    assert ms.check_fingerprint_samples(None) is None and ms.check_fingerprint_samples(1000.0) == 1000


def test_fingerprint_extractor_draws_the_asked_number_of_samples(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    assert ms.fingerprint_extractor(None) is DatasetFingerprintExtractor
    cls = ms.fingerprint_extractor(12345)
    assert issubclass(cls, DatasetFingerprintExtractor)
    # nnU-Net's constructor reads the raw dataset's dataset.json: a minimal one
    monkeypatch.setattr("nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor.nnUNet_raw",
                        str(tmp_path))
    folder = tmp_path / "Dataset970_X"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                     "numTraining": 0, "file_ending": ".nii.gz"}))
    assert cls("Dataset970_X", 1, False).num_foreground_voxels_for_intensitystats == 12345
    assert DatasetFingerprintExtractor("Dataset970_X", 1, False).num_foreground_voxels_for_intensitystats == 10e7


def test_bad_feature_list_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        ms.main(["-d", "999", "-s", "2-2", "--ids", "960", "961", "--features-per-stage", "8", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --features-per-stage takes positive integers" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- add_classes names
def test_add_classes_names_say_what_the_chain_is():
    from nnunetv2_cimis.scenarios.add_classes import ADDED_BY, extension_names
    # a plain nnU-Net model
    assert extension_names("Dataset501_Abdomen", "Dataset520_Pancreas", None) == ("Abdomen+Pancreas",
                                                                                  "AbdomenPlusPancreas")
    # a step of a simulated scenario: its scenario label is not carried over, its StepK suffix is dropped
    assert extension_names("Dataset512_BTCVStep1", "Dataset520_Pancreas",
                           {"scenario": "btcv_4-4-5", "step": 1}) == ("BTCV+Pancreas", "BTCVPlusPancreas")
    # a dataset made by add_classes: its chain continues
    assert extension_names("Dataset521_AbdomenPlusPancreasStep1", "Dataset530_Kidney",
                           {"scenario": "Abdomen+Pancreas", "created_by": ADDED_BY}) == (
        "Abdomen+Pancreas+Kidney", "AbdomenPlusPancreasPlusKidney")


# ------------------------------------------------------------------------------------- -device
def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CIMISError, match="no CUDA GPU.*-device cpu"):
        resolve_device("cuda")
    with pytest.raises(CIMISError, match="unknown device"):
        resolve_device("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")  # GPU by default when present, like nnU-Net
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_step_memory_command_device(monkeypatch, tmp_path, capsys):
    from nnunetv2_cimis.memory import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag in ("-device", "--device"):
        with pytest.raises(SystemExit) as e:
            cli.main(["-m", str(tmp_path), flag, "cuda"])
        assert e.value.code == 2
        assert "PyTorch sees no CUDA GPU" in capsys.readouterr().err
    # the default on a machine without GPU is the CPU: the command gets as far as the missing checkpoint
    with pytest.raises(SystemExit):
        cli.main(["-m", str(tmp_path)])
    assert "has no checkpoint_final.pth" in capsys.readouterr().err


def test_add_classes_refuses_an_absent_gpu_before_any_work(monkeypatch, tmp_path):
    from nnunetv2_cimis.scenarios.add_classes import add_classes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    with pytest.raises(CIMISError, match="-device cuda"):
        add_classes(str(tmp_path / "model"), "950", 951, device="cuda")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------- step-memory progress
def test_step_memory_pass_shows_progress(capsys):
    from test_step_memory import LABELS, _cases_3d, _TinyNet

    from nnunetv2_cimis.memory.compute import compute_step_memory
    quiet = compute_step_memory(_TinyNet(), _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"))
    assert "step memory" not in capsys.readouterr().err
    shown = compute_step_memory(_TinyNet(), _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"),
                                progress=True)
    err = capsys.readouterr().err
    assert "step memory" in err and "2/2" in err
    torch.testing.assert_close(shown.prototypes, quiet.prototypes)
    torch.testing.assert_close(shown.prototype_counts, quiet.prototype_counts)
    shown = compute_step_memory(_TinyNet(), _cases_3d(), ["A", "B"], [2, 2, 2], LABELS, torch.device("cpu"),
                                progress=True, max_cases=1)
    assert "1/1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- evaluate's warning
def test_evaluate_warns_once_about_a_missing_model(tmp_path, monkeypatch, capsys):
    from nnunetv2_cimis.evaluation import evaluate as ev
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    raw, res = str(tmp_path / "raw"), str(tmp_path / "res")
    for var, p in (("nnUNet_raw", raw), ("nnUNet_preprocessed", str(tmp_path / "pre")), ("nnUNet_results", res)):
        os.makedirs(p)
        monkeypatch.setenv(var, p)
    write_abdominal_phantom(raw, 950, 6, shape=(16, 16, 16), organs=["liver", "spleen", "aorta"])
    summary = ms.make_scenario("950", "2-1", [951, 952], 953, test_fraction=0.25, seed=0, preprocess=False)
    step0 = summary["step_datasets"][0]
    fold = os.path.join(res, step0, "nnUNetTrainerFT__nnUNetPlans__3d_fullres", "fold_0")
    os.makedirs(fold)
    open(os.path.join(fold, "checkpoint_final.pth"), "w").close()
    test_set = ev.load_test_set(os.path.join(raw, step0, "test_set.json"))
    label_of = {c: e["label"] for c, e in test_set["cases"].items()}

    def fake_predict(model_dir, fold, images, outputs, *args, **kwargs):
        for out in outputs:
            sitk.WriteImage(sitk.ReadImage(label_of[os.path.basename(out)]), out + ".nii.gz")

    monkeypatch.setattr(ev, "predict_cases", fake_predict)
    capsys.readouterr()
    ev.main(["-d", "952", "-tr", "nnUNetTrainerMiB", "--no-joint", "-o", str(tmp_path / "eval"), "-np", "0"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("skipping models that do not exist") == 1, text
    assert "warning: skipping models that do not exist" in captured.err
    assert "UserWarning" not in text

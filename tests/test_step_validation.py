"""Final validation at steps > 0 (nnunetv2_cimis.training.validation): old classes scored against the teacher,
new classes against the step's masks, through nnU-Net's own scoring and postprocessing functions."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from e2e_utils import in_process_multiprocessing
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.training.validation import SUMMARY_KEY, compose_step_reference, score_step_predictions

OLD, NEW = [1, 2], [3]


@pytest.fixture(autouse=True)
def in_process_pools(monkeypatch):
    import nnunetv2.evaluation.evaluate_predictions as ev
    import nnunetv2.postprocessing.remove_connected_components as pp
    fake = in_process_multiprocessing()
    monkeypatch.setattr(ev, "multiprocessing", fake)
    monkeypatch.setattr(pp, "multiprocessing", fake)


def test_compose_step_reference_by_hand():
    mask = np.array([[0, 3, 3, 0, 0, 255]])
    teacher = np.array([[1, 1, 0, 2, 0, 1]])
    ref = compose_step_reference(mask, teacher, OLD)
    # new class and ignore value from the mask; old classes from the teacher only where the mask is background
    assert ref.tolist() == [[1, 3, 3, 2, 0, 255]]
    assert mask.tolist() == [[0, 3, 3, 0, 0, 255]]  # input untouched
    assert compose_step_reference(mask, np.full_like(mask, 7), OLD).tolist() == mask.tolist()  # no old label: no change
    with pytest.raises(CIMISError, match="same case"):
        compose_step_reference(mask, teacher[:, :3], OLD)


def _write(folder, name, array):
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), os.path.join(folder, name + ".nii.gz"))


@pytest.fixture
def step_case(tmp_path):
    """One 3D case: the step's mask labels the new class 3; the teacher segments the old classes 1 and 2."""
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[1:4, 1:4, 1:4] = 3
    teacher = np.zeros_like(mask)
    teacher[1:4, 5:8, 5:8] = 1
    teacher[4:6, 0:3, 5:8] = 2
    teacher[1:2, 1:3, 1:3] = 1  # the teacher's guess inside the new organ: the mask wins there
    reference = compose_step_reference(mask, teacher, OLD)
    keeps = reference.copy()  # a student that still segments the old organs and learned the new one
    forgets = np.where(reference == 3, 3, 0)  # one that learned the new organ and forgot the old ones
    _write(tmp_path / "masks", "case_000", mask)
    _write(tmp_path / "reference", "case_000", reference)
    _write(tmp_path / "keeps", "case_000", keeps)
    _write(tmp_path / "forgets", "case_000", forgets)
    return tmp_path


def _score(root, which, reference="reference"):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    return score_step_predictions(str(root / which), str(root / reference), str(root / which / "summary.json"),
                                  SimpleITKIO(), ".nii.gz", OLD + NEW, OLD, NEW, "teacher.pth", num_processes=1)


def test_a_model_that_keeps_old_classes_scores_better(step_case):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    keeps, forgets = _score(step_case, "keeps"), _score(step_case, "forgets")
    assert keeps["foreground_mean"]["Dice"] == pytest.approx(1.0)
    assert forgets["foreground_mean"]["Dice"] == pytest.approx(1 / 3)  # new class 1, old classes 0
    assert keeps["foreground_mean"]["Dice"] > forgets["foreground_mean"]["Dice"]
    entry = keeps[SUMMARY_KEY]
    assert entry["mean_dice_old"] == pytest.approx(1.0) and entry["mean_dice_new"] == pytest.approx(1.0)
    assert forgets[SUMMARY_KEY]["mean_dice_old"] == pytest.approx(0.0)
    assert entry["old_labels"] == OLD and entry["new_labels"] == NEW and entry["teacher"] == "teacher.pth"
    # summary.json stays readable by nnU-Net (find_best_configuration reads foreground_mean and mean)
    summary = load_summary_json(str(step_case / "keeps" / "summary.json"))
    assert summary["foreground_mean"]["Dice"] == pytest.approx(1.0) and summary["mean"][1]["Dice"] == pytest.approx(1.0)
    assert summary[SUMMARY_KEY]["mean_dice_old"] == pytest.approx(1.0)
    # what nnU-Net's plain validation does against the step's masks: the model that remembers gets Dice 0 on the
    # old classes (false positives), the one that forgets NaN, and the foreground mean is NaN
    plain = {w: compute_metrics_on_folder(str(step_case / "masks"), str(step_case / w), None, SimpleITKIO(),
                                          ".nii.gz", OLD + NEW, num_processes=1) for w in ("keeps", "forgets")}
    assert plain["keeps"]["mean"][1]["Dice"] == 0.0 and np.isnan(plain["forgets"]["mean"][1]["Dice"])
    assert np.isnan(plain["forgets"]["foreground_mean"]["Dice"])


def test_nnunet_postprocessing_decides_on_step_references(step_case):
    """nnU-Net's determine_postprocessing with -ref the step references: removing components never costs the
    model its old organs (against the masks it would see only false positives there)."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing
    _score(step_case, "keeps")
    plans = {"dataset_name": "Dataset999_X", "plans_name": "P", "image_reader_writer": "SimpleITKIO",
             "configurations": {}}
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "file_ending": ".nii.gz"}
    determine_postprocessing(str(step_case / "keeps"), str(step_case / "reference"), plans, dataset_json,
                             num_processes=1, keep_postprocessed_files=False)
    with open(step_case / "keeps" / "postprocessing.json") as f:
        pp = json.load(f)
    assert pp["postprocessed"]["foreground_mean"]["Dice"] == pytest.approx(1.0)
    assert pp["input_folder"]["mean"]["1"]["Dice"] == pytest.approx(1.0)


def test_find_best_configuration_on_step_references(step_case, roots, monkeypatch):
    """nnU-Net's own find_best_configuration, run on the reference roots written by write_reference_roots,
    scores the model that keeps its old organs at 1.0 (against the step's masks it would see NaN / false
    positives); references that differ between models (different teachers) are refused."""
    import shutil

    from nnunetv2.evaluation.find_best_configuration import find_best_configuration
    from nnunetv2_cimis.training.validation import REFERENCE_FOLDER, write_reference_roots
    ds, plans_name = "Dataset555_StepOne", "P"
    plans = {"dataset_name": ds, "plans_name": plans_name, "image_reader_writer": "SimpleITKIO",
             "configurations": {"3d_fullres": {"data_identifier": "x", "patch_size": [6, 8, 8],
                                               "architecture": {"network_class_name": "x", "arch_kwargs": {},
                                                                "_kw_requires_import": []}}}}
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "CT"}, "numTraining": 1}
    pre = roots / "preprocessed" / ds
    pre.mkdir()
    (pre / "P.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    models = []
    for trainer, prediction in (("nnUNetTrainerA", "keeps"), ("nnUNetTrainerB", "forgets")):
        model = roots / "results" / ds / f"{trainer}__{plans_name}__3d_fullres"
        shutil.copytree(step_case / prediction, model / "fold_0" / "validation")
        shutil.copytree(step_case / "reference", model / "fold_0" / REFERENCE_FOLDER)
        (model / "plans.json").write_text(json.dumps(plans))
        (model / "dataset.json").write_text(json.dumps(dataset_json))
        models.append(str(model))
    out = roots / "refs"
    env = write_reference_roots(ds, models, [0], str(out))
    assert sorted(os.listdir(out / "nnUNet_raw" / ds / "labelsTr")) == ["case_000.nii.gz"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = find_best_configuration(ds, [{"plans": plans_name, "configuration": "3d_fullres", "trainer": t}
                                          for t in ("nnUNetTrainerA", "nnUNetTrainerB")],
                                     allow_ensembling=False, num_processes=1, folds=(0,))
    scores = result["all_results"]
    assert scores[f"nnUNetTrainerA__{plans_name}__3d_fullres"] == pytest.approx(1.0)
    assert scores[f"nnUNetTrainerB__{plans_name}__3d_fullres"] == pytest.approx(1 / 3)
    assert result["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == "nnUNetTrainerA"
    # a model validated against another teacher cannot be ranked on the same reference
    other = np.zeros((6, 8, 8), np.uint8)
    _write(os.path.join(models[1], "fold_0", REFERENCE_FOLDER), "case_000", other)
    with pytest.raises(CIMISError, match="different teachers"):
        write_reference_roots(ds, models, [0], str(roots / "refs2"))
    with pytest.raises(CIMISError, match="already holds"):
        write_reference_roots(ds, models[:1], [0], str(out))

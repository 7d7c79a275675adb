"""Tests of nnunetv2_cimis.scenarios.step_metadata: the ``cimis`` block of a step dataset's dataset.json."""
import copy
import json

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.scenarios.step_metadata import (FORMAT_VERSION, METADATA_KEY, StepInfo, TeacherRef,
                                                    make_metadata, read_step_info)

CLASSES = [[1, 2], [3, 4], [5, 6]]
NAMES = {1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney", 5: "pancreas", 6: "stomach"}
STEPS = ["Dataset901_PStep0", "Dataset902_PStep1", "Dataset903_PStep2"]


def _dataset_json(step, teacher):
    labels = {"background": 0, **{NAMES[v]: v for s in CLASSES[:step + 1] for v in s}}
    meta = make_metadata("phantom_2-2-2", step, CLASSES, teacher, STEPS, "Dataset904_PJoint", "/x/test_set.json",
                         STEPS[0])
    # through JSON, as it is stored in dataset.json
    return json.loads(json.dumps({"labels": labels, "file_ending": ".nii.gz", METADATA_KEY: meta}))


TEACHER_1 = {"dataset": STEPS[0], "trainer": "nnUNetTrainerFT", "same_trainer_as_student": False}
TEACHER_2 = {"dataset": STEPS[1], "trainer": None, "same_trainer_as_student": True}


def test_make_metadata_block_by_hand():
    meta = make_metadata("phantom_2-2-2", 1, CLASSES, TEACHER_1, STEPS, "Dataset904_PJoint", "/x/t.json", STEPS[0])
    assert meta == {"format_version": FORMAT_VERSION, "scenario": "phantom_2-2-2", "step": 1, "num_steps": 3,
                    "classes_per_step": CLASSES, "old_labels": [1, 2], "new_labels": [3, 4], "teacher": TEACHER_1,
                    "step_datasets": STEPS, "joint_dataset": "Dataset904_PJoint", "test_set": "/x/t.json",
                    "plans_source": STEPS[0]}


def test_round_trip_step_1():
    info = read_step_info(_dataset_json(1, TEACHER_1), STEPS[1])
    assert isinstance(info, StepInfo)
    assert info.scenario == "phantom_2-2-2"
    assert (info.index, info.num_steps) == (1, 3)
    assert info.classes_per_step == CLASSES
    assert (info.old_labels, info.new_labels) == ([1, 2], [3, 4])
    assert info.label_names == {0: "background", 1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney"}
    assert info.is_incremental and info.n_old_outputs == 3
    assert info.teacher == TeacherRef(STEPS[0], "nnUNetTrainerFT", False)
    assert info.step_datasets == STEPS and info.joint_dataset == "Dataset904_PJoint"
    assert info.test_set == "/x/test_set.json"
    assert info.raw["plans_source"] == STEPS[0]


def test_round_trip_step_0_and_last_step():
    info0 = read_step_info(_dataset_json(0, None))
    assert info0.index == 0 and not info0.is_incremental
    assert info0.old_labels == [] and info0.new_labels == [1, 2] and info0.n_old_outputs == 1
    assert info0.teacher is None
    info2 = read_step_info(_dataset_json(2, TEACHER_2))
    assert info2.old_labels == [1, 2, 3, 4] and info2.new_labels == [5, 6] and info2.n_old_outputs == 5
    assert info2.teacher == TeacherRef(STEPS[1], None, True)


def test_teacher_trainer_resolution():
    assert TeacherRef("D", "nnUNetTrainerFT", False).trainer_for("nnUNetTrainerMiB") == "nnUNetTrainerFT"
    assert TeacherRef("D", None, True).trainer_for("nnUNetTrainerMiB") == "nnUNetTrainerMiB"
    # same_trainer_as_student wins over a recorded trainer
    assert TeacherRef("D", "nnUNetTrainerFT", True).trainer_for("nnUNetTrainerPLOP") == "nnUNetTrainerPLOP"
    # no trainer recorded: the student's own
    assert TeacherRef("D", None, False).trainer_for("nnUNetTrainerPLOP") == "nnUNetTrainerPLOP"
    assert TeacherRef("D", "", False).trainer_for("nnUNetTrainerPLOP") == "nnUNetTrainerPLOP"
    step2 = read_step_info(_dataset_json(2, TEACHER_2))
    assert step2.teacher.trainer_for("nnUNetTrainerLwF") == "nnUNetTrainerLwF"
    step1 = read_step_info(_dataset_json(1, TEACHER_1))
    assert step1.teacher.trainer_for("nnUNetTrainerLwF") == "nnUNetTrainerFT"


def test_missing_block_names_the_command():
    dj = _dataset_json(1, TEACHER_1)
    del dj[METADATA_KEY]
    with pytest.raises(CIMISError, match="nnUNetv2_cimis_make_scenario") as e:
        read_step_info(dj, "Dataset123_Plain")
    assert "Dataset123_Plain" in str(e.value)


def test_labels_inconsistent_with_classes_per_step():
    dj = _dataset_json(1, TEACHER_1)
    del dj["labels"]["right kidney"]  # the dataset lacks class 4 that step 1 learns
    with pytest.raises(CIMISError, match=r"\[1, 2, 3\] do not match .* \(\[1, 2, 3, 4\]\)"):
        read_step_info(dj)
    dj = _dataset_json(0, None)
    dj["labels"]["left kidney"] = 3  # a future class in the labels of step 0
    with pytest.raises(CIMISError, match="do not match"):
        read_step_info(dj)


def test_wrong_format_version():
    dj = _dataset_json(1, TEACHER_1)
    dj[METADATA_KEY]["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CIMISError, match="format"):
        read_step_info(dj)


def test_region_labels_refused():
    dj = _dataset_json(1, TEACHER_1)
    dj["labels"]["kidneys"] = [3, 4]
    with pytest.raises(CIMISError, match="region"):
        read_step_info(dj)


@pytest.mark.parametrize("key", ["step", "classes_per_step", "old_labels", "new_labels"])
def test_incomplete_block(key):
    dj = _dataset_json(1, TEACHER_1)
    del dj[METADATA_KEY][key]
    with pytest.raises(CIMISError, match="incomplete"):
        read_step_info(dj)


def test_non_integer_label_in_block():
    dj = _dataset_json(1, TEACHER_1)
    dj[METADATA_KEY]["new_labels"] = [3, "four"]
    with pytest.raises(CIMISError, match="incomplete"):
        read_step_info(dj)


@pytest.mark.parametrize("teacher", [None, {}, {"dataset": "", "trainer": "nnUNetTrainerFT"}])
def test_incremental_step_without_teacher(teacher):
    dj = _dataset_json(1, teacher)
    with pytest.raises(CIMISError, match="no teacher"):
        read_step_info(dj)


def test_old_labels_inconsistent_with_classes_per_step():
    dj = _dataset_json(1, TEACHER_1)
    bad = copy.deepcopy(dj)
    bad[METADATA_KEY]["old_labels"] = [1]  # class 2 was learned at step 0 too: n_old_outputs would be 2, not 3
    with pytest.raises(CIMISError):
        read_step_info(bad)

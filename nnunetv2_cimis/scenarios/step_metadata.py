"""The step metadata: the ``cimis`` block of a step dataset's ``dataset.json``.

It records where a dataset stands in an incremental scenario: its step index, the classes learned before
it (old) and at it (new), and which trained model is its teacher. The format is described in
``docs/architecture.md``. :class:`StepInfo` is its validated, read-only view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.naming import check_dataset_folder, check_trainer_name

METADATA_KEY = "cimis"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TeacherRef:
    """Which model taught this step: a dataset and a trainer (or the student's own trainer)."""

    dataset: str
    trainer: Optional[str]
    same_trainer_as_student: bool
    checkpoint: Optional[str] = None  # explicit checkpoint (models extended with nnUNetv2_cimis_add_classes)

    def trainer_for(self, student_trainer: str) -> str:
        return student_trainer if self.same_trainer_as_student or not self.trainer else self.trainer


@dataclass(frozen=True)
class StepInfo:
    """The validated step metadata of a step dataset."""

    scenario: str
    index: int
    num_steps: int
    classes_per_step: List[List[int]]
    old_labels: List[int]
    new_labels: List[int]
    label_names: Dict[int, str]
    teacher: Optional[TeacherRef]
    step_datasets: List[str] = field(default_factory=list)
    joint_dataset: Optional[str] = None
    test_set: Optional[str] = None
    raw: dict = field(default_factory=dict)

    @property
    def is_incremental(self) -> bool:
        """True for steps after the first: there is a teacher and old classes."""
        return self.index > 0

    @property
    def n_old_outputs(self) -> int:
        """Number of teacher outputs (background + old classes)."""
        return 1 + len(self.old_labels)


def make_metadata(scenario: str, index: int, classes_per_step: List[List[int]], teacher: Optional[dict],
                  step_datasets: List[str], joint_dataset: Optional[str], test_set: Optional[str],
                  plans_source: Optional[str]) -> dict:
    """Build the ``cimis`` block of step ``index``."""
    old = [v for s in classes_per_step[:index] for v in s]
    return {
        "format_version": FORMAT_VERSION,
        "scenario": scenario,
        "step": index,
        "num_steps": len(classes_per_step),
        "classes_per_step": classes_per_step,
        "old_labels": old,
        "new_labels": list(classes_per_step[index]),
        "teacher": teacher,
        "step_datasets": step_datasets,
        "joint_dataset": joint_dataset,
        "test_set": test_set,
        "plans_source": plans_source,
    }


def read_step_info(dataset_json: dict, dataset_name: str = "this dataset") -> StepInfo:
    """Parse and check the ``cimis`` block of ``dataset_json``.

    Raises:
        CIMISError: if the block is missing (the dataset was not made by the package's tools: say what to
            run) or inconsistent with the dataset's labels.
    """
    if not isinstance(dataset_json, dict):
        raise CIMISError(f"{dataset_name}: dataset.json must hold a JSON object, got {type(dataset_json).__name__}.")
    block = dataset_json.get(METADATA_KEY)
    if block is None:
        raise CIMISError(
            f"{dataset_name} has no step metadata (no '{METADATA_KEY}' block in its dataset.json), so an incremental "
            f"trainer does not know its old classes or its teacher. Create step datasets with "
            f"`nnUNetv2_cimis_make_scenario` (from a fully labelled dataset) or `nnUNetv2_cimis_add_classes` (from a "
            f"trained nnU-Net model and a dataset labelling only the new classes), then train on those.")
    if not isinstance(block, dict):
        raise CIMISError(f"{dataset_name}: the step metadata ('{METADATA_KEY}' in dataset.json) must be a JSON object, "
                         f"got {type(block).__name__}; recreate the step dataset.")
    if block.get("format_version") != FORMAT_VERSION:
        raise CIMISError(f"{dataset_name}: step metadata format {block.get('format_version')} is not supported "
                         f"(expected {FORMAT_VERSION}); recreate the step datasets with this version of the package.")
    labels = dataset_json.get("labels", {})
    if not isinstance(labels, dict):
        raise CIMISError(f"{dataset_name}: dataset.json 'labels' must map class names to values.")
    names = {}
    for name, value in labels.items():
        if isinstance(value, int):
            names[value] = name
        else:
            raise CIMISError(f"{dataset_name}: label '{name}' is a region {value}; class-incremental steps need "
                             f"plain integer labels.")
    try:
        index = int(block["step"])
        classes_per_step = [[int(v) for v in s] for s in block["classes_per_step"]]
        old = [int(v) for v in block["old_labels"]]
        new = [int(v) for v in block["new_labels"]]
        num_steps = int(block.get("num_steps", -1))
    except (KeyError, TypeError, ValueError) as e:
        raise CIMISError(f"{dataset_name}: the step metadata is incomplete ({e!r}); recreate the step dataset.") from None
    if not 0 <= index < len(classes_per_step) or num_steps != len(classes_per_step):
        raise CIMISError(f"{dataset_name}: step {index} / num_steps {block.get('num_steps')} do not fit the "
                         f"{len(classes_per_step)} steps of classes_per_step; recreate the step dataset.")
    if old != [v for s in classes_per_step[:index] for v in s] or new != classes_per_step[index]:
        raise CIMISError(f"{dataset_name}: old_labels {old} / new_labels {new} contradict classes_per_step "
                         f"{classes_per_step} at step {index}; recreate the step dataset.")
    expected = sorted(v for s in classes_per_step[:index + 1] for v in s)
    have = sorted(v for v in names if v != 0)
    if expected != have:
        raise CIMISError(f"{dataset_name}: dataset.json labels {have} do not match the classes the step metadata "
                         f"says were learned up to step {index} ({expected}).")
    # names read from the file become paths (nnUNet_raw/<dataset>, nnUNet_results/<dataset>/<trainer>__...)
    where = f"{dataset_name}: step metadata"
    step_datasets = block.get("step_datasets", [])
    if not isinstance(step_datasets, list):
        raise CIMISError(f"{where}: 'step_datasets' must be a list of dataset names; recreate the step dataset.")
    for d in step_datasets:
        check_dataset_folder(d, where)
    if block.get("joint_dataset") is not None:
        check_dataset_folder(block["joint_dataset"], where)
    for key in ("test_set", "plans_source"):
        if block.get(key) is not None and not isinstance(block[key], str):
            raise CIMISError(f"{where}: '{key}' must be a string; recreate the step dataset.")
    teacher = None
    if index > 0:
        t = block.get("teacher") or {}
        if not isinstance(t, dict) or not t.get("dataset"):
            raise CIMISError(f"{dataset_name}: step {index} has no teacher recorded in its step metadata.")
        check_dataset_folder(t["dataset"], where)
        if t.get("trainer") is not None:
            check_trainer_name(t["trainer"], where)
        if t.get("checkpoint") is not None and not isinstance(t["checkpoint"], str):
            raise CIMISError(f"{where}: the teacher 'checkpoint' must be a path; recreate the step dataset.")
        teacher = TeacherRef(dataset=t["dataset"], trainer=t.get("trainer"),
                             same_trainer_as_student=bool(t.get("same_trainer_as_student", False)),
                             checkpoint=t.get("checkpoint"))
    return StepInfo(scenario=str(block.get("scenario", "")), index=index, num_steps=num_steps,
                    classes_per_step=classes_per_step, old_labels=old, new_labels=new, label_names=names,
                    teacher=teacher, step_datasets=list(step_datasets),
                    joint_dataset=block.get("joint_dataset"), test_set=block.get("test_set"), raw=block)

"""The one rule for names that become paths: dataset ids, dataset names, case identifiers, trainer names.

Every folder ``DatasetXXX_Name`` the package creates, and every path built from an identifier read from a
file (a source ``dataset.json``, ``test_set.json``, the step metadata), goes through these checks first, so
no name can leave nnU-Net's folders (``../``, ``/``, a leading ``.``) or collide with hidden temporary folders.

The rule is the converters' (``dataset_conversion``): a name starts with a letter or digit and holds only
letters, digits, ``_`` and ``-``. Dataset ids are 1..999, as nnU-Net's three-digit folder names require.
"""
from __future__ import annotations

import re
from typing import Any

from nnunetv2_cimis.errors import CIMISError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_\-]*"
_NAME = re.compile(NAME_PATTERN)
_DATASET_FOLDER = re.compile(r"Dataset(\d{3})_(" + NAME_PATTERN + ")")
_TRAINER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_valid_name(name: Any) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_dataset_id(dataset_id: Any, option: str = "the dataset id") -> int:
    """``dataset_id`` as an int in 1..999, or CIMISError naming ``option``."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise CIMISError(f"{option} must be an integer in 1..999 (nnU-Net's DatasetXXX folders), got {dataset_id!r}")
    return dataset_id


def check_dataset_name(name: Any, option: str = "the dataset name") -> str:
    """The ``Name`` of ``DatasetXXX_Name``: letters, digits, '_' and '-', starting with a letter or digit."""
    if not is_valid_name(name):
        raise CIMISError(f"{option} {name!r} may only hold letters, digits, '_' and '-' (starting with a letter or "
                         f"digit): it becomes the folder name DatasetXXX_<name> inside nnU-Net's folders")
    return name


def dataset_folder_name(dataset_id: Any, name: Any, id_option: str = "the dataset id",
                        name_option: str = "the dataset name") -> str:
    """``DatasetXXX_Name`` as nnU-Net names datasets, after checking the id and the name."""
    check_dataset_id(dataset_id, id_option)
    check_dataset_name(name, name_option)
    return f"Dataset{dataset_id:03d}_{name}"


def check_dataset_folder(folder_name: Any, where: str) -> str:
    """A ``DatasetXXX_Name`` read from a file (step metadata): refused unless it follows the rule."""
    m = _DATASET_FOLDER.fullmatch(folder_name) if isinstance(folder_name, str) else None
    if m is None or not 1 <= int(m.group(1)) <= 999:
        raise CIMISError(f"{where}: {folder_name!r} is not a dataset folder name DatasetXXX_Name (XXX in 001..999, "
                         f"Name of letters, digits, '_' and '-'); the file was edited or damaged. Recreate it with "
                         f"the package's commands.")
    return folder_name


def check_case_identifier(identifier: Any, where: str) -> str:
    """A case identifier (file names are built from it): refused unless it follows the rule."""
    if not is_valid_name(identifier):
        raise CIMISError(f"{where}: case identifier {identifier!r} may only hold letters, digits, '_' and '-' "
                         f"(starting with a letter or digit); file names are built from it. Rename the case.")
    return identifier


def check_file_ending(file_ending: Any, where: str) -> str:
    """A ``file_ending`` read from a file (``.nii.gz``, ``.png``, ...): a dot, then letters, digits and dots."""
    if not isinstance(file_ending, str) or re.fullmatch(r"\.[A-Za-z0-9][A-Za-z0-9.]*", file_ending) is None:
        raise CIMISError(f"{where}: file_ending {file_ending!r} is not a file extension such as '.nii.gz'.")
    return file_ending


def check_trainer_name(name: Any, where: str) -> str:
    """A trainer name read from a file (it becomes part of a results folder name): a Python identifier."""
    if not isinstance(name, str) or _TRAINER.fullmatch(name) is None:
        raise CIMISError(f"{where}: trainer {name!r} is not a trainer class name (a Python identifier).")
    return name

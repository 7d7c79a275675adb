"""nnU-Net's folders and dataset names: the environment variables that name them (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``), a dataset's folder name from its id or name, and the one rule for
whether a dataset id is free (nnU-Net resolves an id in all three folders).

Used by every part that reads or writes nnU-Net's folders (scenarios, phantoms, converters, step memory,
evaluation, submission); it imports nothing of the package but its errors.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

from nnunetv2_cimis.errors import CIMISError


def require_env(name: str) -> str:
    """The folder an nnU-Net environment variable (``nnUNet_raw``, ...) names, or a clear error when unset."""
    value = os.environ.get(name)
    if not value:
        raise CIMISError(f"The environment variable {name} is not set. Set nnUNet_raw, nnUNet_preprocessed and "
                         f"nnUNet_results as for nnU-Net (see docs/usage.md).")
    return value


def dataset_name(dataset: str) -> str:
    """``"4"``, ``4`` or ``"Dataset004_Hippocampus"`` -> the dataset's folder name, or a clear error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError, AssertionError):
        raise CIMISError(f"Unknown dataset {dataset!r}: no DatasetXXX folder with that id or name in nnUNet_raw, "
                         f"nnUNet_preprocessed or nnUNet_results.") from None


NNUNET_ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _nnunet_roots(raw: Optional[str]) -> List[Tuple[str, str]]:
    """(label, folder) of the folders where nnU-Net looks a dataset id up: ``raw`` (default ``$nnUNet_raw``),
    and ``$nnUNet_preprocessed`` / ``$nnUNet_results`` when ``raw`` is ``$nnUNet_raw`` (another raw folder
    has no preprocessed or results folders of its own)."""
    env_raw = os.environ.get("nnUNet_raw")
    if raw is not None and not (env_raw and os.path.abspath(raw) == os.path.abspath(env_raw)):
        return [(os.fspath(raw), os.fspath(raw))]
    return [(f"${var}", os.environ[var]) for var in NNUNET_ROOTS if os.environ.get(var)]


def dataset_id_taken(dataset_id: int, allow: Optional[str] = None, raw: Optional[str] = None) -> Optional[str]:
    """The one rule for whether a dataset id is free: the first ``DatasetXXX_*`` entry with this id in
    nnUNet_raw / _preprocessed / _results (nnU-Net resolves an id in all three), other than ``allow`` (the
    caller's own dataset when it may replace it); None when the id is free.

    Args:
        dataset_id: 1..999.
        allow: a folder name ``DatasetXXX_Name`` that does not count as a clash.
        raw: the raw folder written to, when not ``$nnUNet_raw`` (then only that folder is checked).
    """
    pattern = re.compile(rf"^Dataset{int(dataset_id):03d}_")
    for _, root in _nnunet_roots(raw):
        if os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if pattern.match(entry) and entry != allow:
                    return os.path.join(root, entry)
    return None


def claim_dataset_id(dataset_id: int, folder_name: Optional[str] = None, overwrite: bool = False,
                     raw: Optional[str] = None, option: str = "id", overwrite_hint: str = "") -> None:
    """Refuse a dataset id that :func:`dataset_id_taken` finds taken, with a message that says where.

    With ``overwrite``, the caller's own ``folder_name`` may exist (it will be replaced); any other folder
    with the id is refused. ``option`` names the flag that chooses the id, ``overwrite_hint`` how to replace.
    """
    taken = dataset_id_taken(dataset_id, allow=folder_name if overwrite else None, raw=raw)
    if taken is None:
        return
    root, entry = os.path.split(taken)
    if entry == folder_name:
        raise CIMISError(f"{taken} already exists: dataset id {dataset_id} is already taken; choose another "
                         f"{option}{overwrite_hint}")
    label = next((lbl for lbl, r in _nnunet_roots(raw) if os.path.abspath(r) == os.path.abspath(root)), root)
    raise CIMISError(f"dataset id {dataset_id} is already taken: already used in {label}: {entry}; choose another "
                     f"{option} or remove that folder")


def claim_raw_dataset_folder(raw_folder: str, dataset_id: int, name: str, overwrite: bool = False,
                             name_option: str = "dataset_name (--name)") -> str:
    """``raw_folder/DatasetXXX_name`` for a generator that writes a whole raw dataset (the phantoms): ``name``
    checked (``name_option`` is how the user gives it), the id claimed by :func:`claim_dataset_id`, and, with
    ``overwrite``, the generator's own earlier folder of that name removed (any other folder with the id is
    refused). ``raw_folder`` is created; the returned dataset folder is not."""
    import shutil

    from nnunetv2_cimis.naming import check_dataset_name
    check_dataset_name(name, name_option)
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    os.makedirs(raw_folder, exist_ok=True)
    claim_dataset_id(int(dataset_id), folder_name, overwrite, raw=raw_folder, overwrite_hint=" or pass overwrite=True")
    out = os.path.join(raw_folder, folder_name)
    if os.path.lexists(out):  # overwrite=True: replace this generator's dataset
        shutil.rmtree(out)
    return out

"""Reading source datasets and writing step datasets in nnU-Net's raw format.

Images are never copied: a step dataset lists its image files under the ``dataset`` key of its
``dataset.json`` (nnU-Net reads image paths from there), and only the remapped label maps are written.
Every dataset is written into a hidden temporary folder and renamed when complete, so an interruption or an
error leaves no half-written dataset in ``nnUNet_raw``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.integrity import check_file_complete
from nnunetv2_cimis.naming import check_case_identifier, check_file_ending
from nnunetv2_cimis.nnunet_folders import require_env
from nnunetv2_cimis.safe_load import load_json_object


def load_raw_dataset(name: str) -> Tuple[str, dict, Dict[str, dict]]:
    """(raw folder, dataset.json, {case: {"images": [...], "label": path}}) of a raw dataset."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    folder = os.path.join(require_env("nnUNet_raw"), name)
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise CIMISError(f"{folder} has no dataset.json: is {name} an nnU-Net raw dataset?")
    dataset_json = load_json_object(path, f"dataset.json of {name}")
    for key in ("labels", "channel_names", "file_ending"):
        if key not in dataset_json:
            raise CIMISError(f"{path} lacks the required key '{key}'.")
    check_file_ending(dataset_json["file_ending"], path)
    cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    if not cases:
        raise CIMISError(f"{name} has no training cases (imagesTr/labelsTr are empty).")
    for case in cases:  # label files of new datasets are named after them: nothing may leave the dataset folder
        check_case_identifier(case, f"{path}")
    for case, files in cases.items():
        for f_ in list(files["images"]) + [files["label"]]:
            if not os.path.isfile(f_):
                raise CIMISError(f"Case {case} of {name}: file {f_} does not exist.")
    return folder, dataset_json, cases


def plain_labels(dataset_json: dict, where: str) -> Dict[str, int]:
    """The dataset's labels as name -> int, refusing region-based labels."""
    out = {}
    if not isinstance(dataset_json.get("labels"), dict):
        raise CIMISError(f"{where}: dataset.json 'labels' must map class names to integer values.")
    for name, value in dataset_json["labels"].items():
        if name == "ignore":
            continue
        if not isinstance(value, int):
            raise CIMISError(f"{where}: label '{name}' is a region ({value}). Scenarios need a plain label map; "
                             f"convert the dataset in its plain-label form.")
        out[name] = value
    if out.get("background", 0) != 0 or 0 not in out.values():
        raise CIMISError(f"{where}: label 0 must be 'background'.")
    return out


class SegmentationIO:
    """Read and write label maps with the reader/writer nnU-Net uses for this dataset's file type."""

    def __init__(self, dataset_json: dict, example_file: str):
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
        self.rw = determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)()

    def read(self, path: str) -> Tuple[np.ndarray, dict]:
        check_file_complete(path, "label file")  # SimpleITK would fill a truncated file with zeros
        try:
            seg, props = self.rw.read_seg(path)
        except Exception as e:
            raise CIMISError(f"Cannot read the label file {path} ({type(e).__name__}: {e}). Is it corrupt?") from None
        return seg[0], props

    def write(self, seg: np.ndarray, path: str, props: dict) -> None:
        self.rw.write_seg(seg, path, props)


def check_images_readable(io: SegmentationIO, images: Sequence[str]) -> None:
    """Open each image once (header and data), so a corrupt file is named now rather than deep in nnU-Net;
    truncated files (which SimpleITK would fill with zeros) are refused."""
    for p in images:
        check_file_complete(p, "image")
        try:
            io.rw.read_images([p])
        except Exception as e:
            raise CIMISError(f"Cannot read the image {p} ({type(e).__name__}: {e}). Is it corrupt?") from None


def remap(seg: np.ndarray, mapping: Mapping[int, int], known: Sequence[int], where: str) -> np.ndarray:
    """Map source label values to global values; values not in ``mapping`` become 0.

    Raises CIMISError for a value the dataset does not declare.
    """
    values = np.unique(seg)
    unknown = sorted(int(v) for v in values if int(v) not in set(known))
    if unknown:
        raise CIMISError(f"{where} contains label values {unknown} that dataset.json does not declare.")
    lut = np.zeros(int(max(max(known), values.max())) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[seg.astype(np.int64)]


def sigterm_as_interrupt() -> Callable[[], None]:
    """Handle SIGTERM (what ``timeout``, SLURM and ``kill`` send) like Ctrl-C: raise KeyboardInterrupt, so the
    caller's clean-up runs. Returns the function that restores the previous handler (a no-op outside the main
    thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextmanager
def staged_folder(final: str) -> Iterator[str]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` on success, delete it on error."""
    if os.path.exists(final):
        raise CIMISError(f"{final} already exists; choose another dataset id or remove it.")
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


def raw_relative(path: str, folder: str) -> str:
    """How a file is referenced from ``folder`` (a raw dataset folder) so that moving ``nnUNet_raw`` keeps it valid.

    nnU-Net (``get_filenames_of_train_images_and_targets``) resolves a relative entry of dataset.json's
    ``dataset`` key against the dataset's own folder (after expanding environment variables); the package's test
    set is resolved against the folder of test_set.json likewise. A file inside ``$nnUNet_raw`` is therefore
    written relative to ``folder`` (``../Dataset500_X/imagesTr/case_0000.nii.gz``); a file outside it keeps its
    absolute path (it does not move with the folder).
    """
    p = os.path.abspath(path)
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        return p
    raw = os.path.abspath(raw)
    try:
        if os.path.commonpath([p, raw]) != raw or os.path.commonpath([os.path.abspath(folder), raw]) != raw:
            return p
        return os.path.relpath(p, os.path.abspath(folder))
    except ValueError:  # different drives (Windows)
        return p


def write_label_dataset(final_folder: str, base_json: dict, cases: Mapping[str, dict], labels: Dict[str, int],
                        mapping: Mapping[int, int], known_source_values: Sequence[int], io: SegmentationIO,
                        extra: Optional[dict] = None, labels_subfolder: str = "labelsTr") -> dict:
    """Write a raw dataset whose images are the source files and whose labels are remapped copies.

    Args:
        final_folder: ``$nnUNet_raw/DatasetXXX_Name``.
        base_json: the source dataset.json (channel_names, file_ending, ... are kept).
        cases: case -> {"images": [abs paths], "label": abs source label path}. Images are referenced, not
            copied: relative to ``final_folder`` when inside ``$nnUNet_raw`` (:func:`raw_relative`).
        labels: the new dataset's labels (name -> global value).
        mapping: source value -> global value (unlisted values -> 0).
        known_source_values: values the source declares.
        extra: extra top-level keys (e.g. the ``cimis`` block).
    """
    file_ending = base_json["file_ending"]
    with staged_folder(final_folder) as tmp:
        os.makedirs(os.path.join(tmp, labels_subfolder))
        entries = {}
        for case, files in cases.items():
            seg, props = io.read(files["label"])
            out = remap(seg, mapping, known_source_values, files["label"])
            rel = f"{labels_subfolder}/{case}{file_ending}"
            io.write(out, os.path.join(tmp, rel), props)
            entries[case] = {"images": [raw_relative(p, final_folder) for p in files["images"]], "label": rel}
        dataset_json = {k: v for k, v in base_json.items() if k not in ("dataset", "labels", "numTraining", "cimis")}
        dataset_json.update({"labels": labels, "numTraining": len(entries), "dataset": entries})
        if extra:
            dataset_json.update(extra)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
    return dataset_json

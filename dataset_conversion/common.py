"""Shared machinery of the dataset converters: label maps, input checks and the nnU-Net raw dataset writer.

Every converter in this package does three things: it finds the cases in the folder as the dataset's own
download unpacks it, it hands each case to a :class:`RawDatasetWriter`, and it exposes a ``main`` wrapped with
:func:`nnunetv2_cimis.errors.cli_entry`. The writer does all checks that are the same for every dataset:

- the image and the label of a case have the same grid (shape, spacing, origin, direction);
- every value in a label file is a value of the dataset's label map;
- every label file has an image (:func:`pair_by_identifier`);
- the output goes to a hidden temporary sibling folder of ``$nnUNet_raw/DatasetXXX_Name`` and is renamed at
  the end, so that a failed conversion leaves nothing half-written in ``nnUNet_raw``.

Bad input raises :class:`~nnunetv2_cimis.errors.CIMISError` naming the file and what is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunetv2_cimis.command_options import add_version_argument
from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.integrity import check_file_complete
from nnunetv2_cimis.nnunet_folders import claim_dataset_id

LABEL_MAP_DIR = Path(__file__).resolve().parent / "label_maps"
PathLike = Union[str, os.PathLike]

#: Tolerances of the grid comparison between an image and its label (nnU-Net compares with np.allclose too).
SPACING_RTOL = 1e-3
ORIGIN_ATOL = 1e-2  # mm
DIRECTION_ATOL = 1e-3


# ----------------------------------------------------------------------------------------------- label maps
def load_label_map(name: str) -> dict:
    """Read ``label_maps/<name>.json`` (name is the converter's module name, e.g. ``"btcv"``).

    The file holds ``dataset`` (the name presets use), ``source``, ``labels`` (class name -> value, as written to
    dataset.json, background 0 included) and ``official_names`` (value -> the dataset's own spelling).
    """
    path = LABEL_MAP_DIR / f"{name}.json"
    if not path.is_file():
        raise CIMISError(f"no label map {path}; known: {sorted(p.stem for p in LABEL_MAP_DIR.glob('*.json'))}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def label_values(labels: Mapping[str, Union[int, Sequence[int]]]) -> List[int]:
    """All integer values a label file may hold, for plain labels or nnU-Net regions (lists of values)."""
    values = set()
    for v in labels.values():
        values.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted(values)


# ----------------------------------------------------------------------------------------------- input checks
def require_dir(path: PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise CIMISError saying which folder of the download is missing."""
    p = Path(path)
    if not p.is_dir():
        raise CIMISError(f"{what}: folder {p} does not exist (or is not a folder)")
    return p


def find_root(input_folder: PathLike, required: Sequence[str], wrappers: Sequence[str] = ("",),
              dataset: str = "the dataset", glob: Optional[str] = None) -> Path:
    """Find the folder that holds all of ``required`` (relative paths): ``input_folder`` itself or one of the
    ``wrappers`` below it (the folder names the download unpacks into, e.g. ``RawData``). ``glob``: a pattern
    that must also match at least one entry of the root (e.g. ``case_*``).

    Raises CIMISError if the input folder is missing or none of the candidates holds the expected layout.
    """
    base = require_dir(input_folder, f"--input of {dataset}")
    for w in wrappers:
        cand = base / w if w else base
        if cand.is_dir() and all((cand / r).exists() for r in required) and (glob is None or any(cand.glob(glob))):
            return cand
    tried = ", ".join(str(base / w) if w else str(base) for w in wrappers)
    expected = ", ".join([*required, *([glob] if glob else [])])
    raise CIMISError(
        f"{base} does not look like {dataset} as its download unpacks: expected {expected} "
        f"inside one of: {tried}. Point --input at the unpacked download.")


def list_files(folder: Path, suffix: str) -> List[Path]:
    """Files of ``folder`` ending with ``suffix``, sorted, without hidden files (``.`` / ``._`` macOS copies,
    names starting with ``_``) as nnU-Net's own MSD converter skips them."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.endswith(suffix) and not p.name.startswith((".", "_")))


def match_files(folder: Path, pattern: str, suffix: str) -> Dict[str, Path]:
    """Map the first group of regex ``pattern`` (matched against the whole file name) to the file.

    Files ending with ``suffix`` that do not match raise CIMISError: a file the converter does not understand
    is more likely a mis-laid download than something to skip silently.
    """
    out: Dict[str, Path] = {}
    rx = re.compile(pattern)
    for p in list_files(folder, suffix):
        m = rx.fullmatch(p.name)
        if m is None:
            raise CIMISError(f"unexpected file {p}: names in {folder} should match {pattern}")
        out[m.group(1)] = p
    return out


def pair_by_identifier(images: Mapping[str, object], labels: Mapping[str, Path], *,
                       images_without_label: str = "error") -> Tuple[List[str], List[str]]:
    """Pair image and label files by case identifier.

    Returns (identifiers with a label, identifiers without one). A label without an image always raises
    CIMISError naming the label file; an image without label raises too unless ``images_without_label`` is
    ``"test"`` (then it is returned as an unlabelled case).
    """
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise CIMISError(f"label file {labels[orphans[0]]} has no image (case {orphans[0]!r}); "
                         f"{len(orphans)} label file(s) without image in total")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled and images_without_label == "error":
        first = images[unlabelled[0]]
        raise CIMISError(f"image {first} has no label file (case {unlabelled[0]!r}); "
                         f"{len(unlabelled)} image(s) without label in total")
    return sorted(set(images) & set(labels)), unlabelled


def collect_case_folders(root: Path, image_name: str, label_name: str) -> Tuple[Dict[str, Path], Dict[str, Path]]:
    """KiTS-style layout ``root/case_XXXXX/{image_name,label_name}``: maps case folder name -> file.

    A case folder with a label but no image raises CIMISError (via :func:`pair_by_identifier` later)."""
    images: Dict[str, Path] = {}
    labels: Dict[str, Path] = {}
    cases = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("case_"))
    if not cases:
        raise CIMISError(f"no case_XXXXX folders in {root}")
    for c in cases:
        if (c / image_name).is_file():
            images[c.name] = c / image_name
        if (c / label_name).is_file():
            labels[c.name] = c / label_name
    return images, labels


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class Grid:
    """The pixel grid of an image file: shape in (x, y[, z]) order, spacing, origin, direction."""
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    def mismatch(self, other: "Grid") -> Optional[str]:
        """None if both grids agree (within the module tolerances), otherwise a sentence saying how."""
        if self.shape != other.shape:
            return f"shape {self.shape} vs {other.shape}"
        if not np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
            return f"spacing {self.spacing} vs {other.spacing}"
        if not np.allclose(self.origin, other.origin, rtol=0, atol=ORIGIN_ATOL):
            return f"origin {self.origin} vs {other.origin}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_ATOL):
            return f"direction {self.direction} vs {other.direction}"
        return None


def read_grid(path: PathLike, drop_last_axis: bool = False) -> Grid:
    """Read the grid from the header only (no voxel data). ``drop_last_axis``: for a 4D MSD image, the grid
    of one channel. PNG files have spacing 1 and shape (width, height). Unreadable files raise CIMISError."""
    path = str(path)
    if path.endswith(".png"):
        from PIL import Image
        try:
            with Image.open(path) as im:
                return Grid(tuple(im.size), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
        except Exception as e:  # PIL raises many types
            raise CIMISError(f"cannot read {path}: {e}") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CIMISError(f"cannot read {path}: {str(e).strip().splitlines()[-1]}") from None
    shape, spacing, origin = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin()
    direction = reader.GetDirection()
    if drop_last_axis and len(shape) == 4:
        d = np.array(direction).reshape(4, 4)[:3, :3].ravel()
        return Grid(tuple(shape[:3]), tuple(spacing[:3]), tuple(origin[:3]), tuple(float(x) for x in d))
    return Grid(tuple(shape), tuple(spacing), tuple(origin), tuple(direction))


def read_label_array(path: PathLike) -> np.ndarray:
    """Voxel data of a label file (NIfTI via SimpleITK, PNG via Pillow); unreadable files raise CIMISError."""
    path = str(path)
    check_file_complete(path, "label file")  # SimpleITK would fill a truncated file with zeros
    try:
        if path.endswith(".png"):
            from PIL import Image
            with Image.open(path) as im:
                return np.asarray(im)
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except Exception as e:
        raise CIMISError(f"cannot read {path}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None


def check_label_values(values: np.ndarray, allowed: Iterable[int], where: str, dataset: str) -> None:
    """Raise CIMISError if ``values`` (the unique values of a label file) holds a value not in ``allowed``."""
    allowed = set(int(a) for a in allowed)
    values = np.asarray(values)
    non_integer = values[values != np.round(values)]
    if non_integer.size:
        raise CIMISError(f"label file {where} holds non-integer values {non_integer[:5].tolist()}")
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        raise CIMISError(f"label file {where} holds value(s) {unknown} that are not in the label map of {dataset} "
                         f"(allowed: {sorted(allowed)}); is this the right dataset / the right converter?")


# ----------------------------------------------------------------------------------------------- writer
def nnunet_raw_folder() -> Path:
    """``$nnUNet_raw`` (read when called, so tests can set it), created if missing."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise CIMISError("the environment variable nnUNet_raw is not set; set it to nnU-Net's raw data folder")
    p = Path(raw)
    p.mkdir(parents=True, exist_ok=True)
    return p


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` as nnU-Net names raw datasets; checks the id (1..999) and the name (no spaces)."""
    from nnunetv2_cimis.naming import dataset_folder_name as checked_folder_name
    return checked_folder_name(dataset_id, name, "--output-id", "--name")


class RawDatasetWriter:
    """Build one nnU-Net raw dataset atomically: ``$nnUNet_raw/DatasetXXX_Name``.

    Use as a context manager. Cases are written into a hidden sibling folder (``.DatasetXXX_Name.partial-*``);
    :meth:`finish` writes dataset.json and renames the folder into place. Leaving the ``with`` block by an
    exception (or without calling :meth:`finish`) deletes the temporary folder: nothing half-written remains.

    Args:
        dataset_id: nnU-Net dataset id, 1..999. An existing raw dataset with this id raises CIMISError unless
            ``overwrite`` and its folder name is the same (it is then replaced only after success).
        name: dataset name (the ``Name`` of ``DatasetXXX_Name``).
        dataset: the dataset's display name for messages (e.g. ``"BTCV"``).
        labels: the dataset.json ``labels`` (name -> value or list of values for regions).
        channel_names: dataset.json ``channel_names`` (index -> name; "CT" selects CT normalisation).
        file_ending: ``".nii.gz"`` or ``".png"``.
        allowed_values: values a label file may hold (default: all values of ``labels``).
        overwrite: replace an existing dataset of the same folder name.
        files_per_case: image files per case (default: one per channel; 1 for RGB PNG, whose three channels
            nnU-Net's NaturalImage2DIO reads from one file).
    """

    def __init__(self, dataset_id: int, name: str, dataset: str, labels: Mapping, channel_names: Mapping,
                 file_ending: str = ".nii.gz", allowed_values: Optional[Iterable[int]] = None,
                 overwrite: bool = False, files_per_case: Optional[int] = None):
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.dataset = dataset
        self.labels = dict(labels)
        self.channel_names = {str(k): v for k, v in channel_names.items()}
        self.num_channels = len(self.channel_names)
        self.files_per_case = files_per_case or self.num_channels
        self.file_ending = file_ending
        self.allowed_values = sorted(set(allowed_values) if allowed_values is not None
                                     else set(label_values(self.labels)))
        self.raw = nnunet_raw_folder()
        self.target = self.raw / self.folder_name
        claim_dataset_id(dataset_id, self.folder_name, overwrite, raw=os.fspath(self.raw), option="--output-id",
                         overwrite_hint=" or pass --overwrite to replace it")
        self.tmp: Optional[Path] = None
        self.num_training = 0
        self.num_test = 0
        self._identifiers = set()

    # context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> "RawDatasetWriter":
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder_name}.partial-", dir=self.raw))
        for sub in ("imagesTr", "labelsTr"):
            (self.tmp / sub).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    # cases -------------------------------------------------------------------------------------------------
    def _new_identifier(self, identifier: str) -> None:
        from nnunetv2_cimis.naming import check_case_identifier
        check_case_identifier(identifier, self.dataset)
        if identifier in self._identifiers:
            raise CIMISError(f"case identifier {identifier!r} occurs twice in the input")
        self._identifiers.add(identifier)

    def _write_channels(self, identifier: str, image_files: Sequence[PathLike], split: str) -> Grid:
        if len(image_files) != self.files_per_case:
            raise CIMISError(f"case {identifier}: {len(image_files)} image file(s), expected {self.files_per_case}")
        for f in image_files:
            check_file_complete(f, "image")  # SimpleITK would fill a truncated file with zeros
        grids = [read_grid(f) for f in image_files]
        for f, g in zip(image_files[1:], grids[1:]):
            bad = grids[0].mismatch(g)
            if bad:
                raise CIMISError(f"case {identifier}: channel file {f} has another grid than {image_files[0]}: {bad}")
        (self.tmp / split).mkdir(exist_ok=True)
        for c, f in enumerate(image_files):
            shutil.copyfile(f, self.tmp / split / f"{identifier}_{c:04d}{self.file_ending}")
        return grids[0]

    def _write_4d(self, identifier: str, image_4d: PathLike, split: str) -> Grid:
        """Split a 4D image into channel files with nnU-Net's own MSD function."""
        from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti
        check_file_complete(image_4d, "image")
        grid4 = read_grid(image_4d)
        n = grid4.shape[3] if len(grid4.shape) == 4 else 1
        if n != self.num_channels:
            raise CIMISError(f"image {image_4d} has {n} channel(s), the dataset's dataset.json lists "
                             f"{self.num_channels} modalities")
        (self.tmp / split).mkdir(exist_ok=True)
        name = Path(image_4d).name
        if not name.endswith(".nii.gz") or name[:-7] != identifier:
            raise CIMISError(f"4D image {image_4d} must be named {identifier}.nii.gz")
        try:
            split_4d_nifti(str(image_4d), str(self.tmp / split))
        except Exception as e:
            raise CIMISError(f"cannot split the 4D image {image_4d}: {e}") from None
        return read_grid(image_4d, drop_last_axis=True)

    def _check_label(self, identifier: str, grid: Grid, label_file: Optional[PathLike],
                     label_array: Optional[np.ndarray], label_source: str) -> Optional[np.ndarray]:
        if label_array is None:
            lgrid = read_grid(label_file)
            data = read_label_array(label_file)
            where = str(label_file)
        else:
            data = np.asarray(label_array)
            where = label_source
            lgrid = Grid(tuple(data.shape[::-1]), grid.spacing, grid.origin, grid.direction)
        bad = grid.mismatch(lgrid)
        if bad:
            raise CIMISError(f"case {identifier}: label {where} and its image have different grids: {bad}")
        check_label_values(np.unique(data), self.allowed_values, where, self.dataset)
        return data

    def add_case(self, identifier: str, image_files: Sequence[PathLike] = (), label_file: Optional[PathLike] = None,
                 *, image_4d: Optional[PathLike] = None, label_array: Optional[np.ndarray] = None,
                 label_source: str = "", test: bool = False) -> None:
        """Write one case.

        Args:
            identifier: case identifier (files become ``<identifier>_0000<ending>``, ``<identifier><ending>``).
            image_files: one file per channel, copied as they are; or
            image_4d: one 4D NIfTI (MSD) split into channels by nnU-Net's ``split_4d_nifti``.
            label_file: label file, copied as it is after the checks; or
            label_array: label voxels built by the converter (DSAD), written as uint8 PNG / NIfTI.
            label_source: what ``label_array`` was built from, for error messages.
            test: write to imagesTs (and labelsTs if a label is given) instead of imagesTr / labelsTr.
        Raises:
            CIMISError: unreadable files, wrong channel count, image/label grids differ, unknown label values.
        """
        if self.tmp is None:
            raise RuntimeError("use RawDatasetWriter as a context manager")
        self._new_identifier(identifier)
        split_img, split_lab = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
        has_label = label_file is not None or label_array is not None
        if not test and not has_label:
            raise CIMISError(f"training case {identifier} has no label")
        grid = (self._write_4d(identifier, image_4d, split_img) if image_4d is not None
                else self._write_channels(identifier, list(image_files), split_img))
        if has_label:
            data = self._check_label(identifier, grid, label_file, label_array, label_source)
            (self.tmp / split_lab).mkdir(exist_ok=True)
            out = self.tmp / split_lab / f"{identifier}{self.file_ending}"
            if label_array is None:
                shutil.copyfile(label_file, out)
            else:
                write_label_array(np.asarray(data), out,
                                  reference=self.tmp / split_img / f"{identifier}_0000{self.file_ending}")
        if test:
            self.num_test += 1
        else:
            self.num_training += 1

    # finish --------------------------------------------------------------------------------------------------
    def finish(self, **dataset_json_extra) -> Path:
        """Write dataset.json (nnU-Net's generate_dataset_json; extra keys are passed through) and move the
        folder into place. Returns the final folder."""
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        if self.num_training == 0:
            raise CIMISError(f"no training case found for {self.dataset}; check --input")
        extra = dict(dataset_json_extra)
        regions_class_order = extra.pop("regions_class_order", None)
        generate_dataset_json(str(self.tmp), dict(self.channel_names), dict(self.labels),
                              num_training_cases=self.num_training, file_ending=self.file_ending,
                              regions_class_order=regions_class_order, numTest=self.num_test,
                              converted_by="nnunetv2-cimis dataset_conversion", **extra)
        if self.target.exists():  # only with overwrite (checked in __init__): swap after success
            old = self.raw / f".{self.folder_name}.replaced-{os.getpid()}"
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.target)
        self.tmp = None
        return self.target


def write_label_array(data: np.ndarray, out: Path, reference: Optional[Path] = None) -> None:
    """Write label voxels: PNG (uint8, 2D) or NIfTI (int16, geometry copied from the image ``reference``)."""
    if str(out).endswith(".png"):
        from PIL import Image
        if data.max(initial=0) > 255:
            raise CIMISError(f"label values above 255 cannot be written to PNG ({out})")
        Image.fromarray(data.astype(np.uint8)).save(out)
    else:
        img = sitk.GetImageFromArray(data.astype(np.int16))
        if reference is not None:
            ref = sitk.ReadImage(str(reference))
            img.CopyInformation(ref)
        sitk.WriteImage(img, str(out), True)


# ----------------------------------------------------------------------------------------------- CLI
def make_parser(prog: str, dataset: str, layout: str, default_name: str) -> argparse.ArgumentParser:
    """The arguments every converter shares: --input, --output-id, --name, --overwrite."""
    p = argparse.ArgumentParser(prog=prog, description=f"Convert {dataset} into an nnU-Net raw dataset "
                                f"$nnUNet_raw/DatasetXXX_{default_name}. Expected input layout: {layout}")
    add_version_argument(p)
    p.add_argument("--input", "-i", required=True, help="the folder as the download unpacks it")
    p.add_argument("--output-id", "-d", required=True, type=int, help="nnU-Net dataset id (1..999)")
    p.add_argument("--name", default=default_name, help=f"dataset name (default {default_name})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same folder name")
    return p


def report(path: Path, writer: RawDatasetWriter) -> None:
    """One line on stdout after a successful conversion."""
    print(f"wrote {path} ({writer.num_training} training case(s), {writer.num_test} test case(s))")


def convert_paired_folders(*, dataset: str, label_map_name: str, root: Path, output_id: int, name: str,
                           overwrite: bool, train: Tuple[str, str, str, str], test: Optional[Tuple[str, str]] = None,
                           identifier: Callable[[str], str] = lambda s: s,
                           labelled_test: Optional[Tuple[str, str, str, str]] = None,
                           extra_train: Sequence[Tuple[str, str, str, str]] = (),
                           keep: Callable[[str], bool] = lambda s: True,
                           channel_names: Optional[Mapping] = None, **dataset_json_extra) -> Path:
    """The common case: images and labels in two folders, paired by a regex group.

    Args:
        train: (image subfolder, image regex, label subfolder, label regex) of labelled training cases; each regex
            has one group, the case key.
        extra_train: more labelled folders merged into the training set (AMOS imagesVa, WORD imagesVal).
        test: (image subfolder, image regex) of unlabelled test images (skipped if the folder is absent).
        labelled_test: like ``train``, for a test set with labels (WORD imagesTs/labelsTs).
        identifier: case key -> nnU-Net case identifier.
        keep: case key -> whether to convert it (AMOS CT/MRI selection).
    """
    lm = load_label_map(label_map_name)
    labels = lm["labels"]
    with RawDatasetWriter(output_id, name, dataset, labels, channel_names or {0: "CT"},
                          overwrite=overwrite) as w:
        for i, (img_dir, img_rx, lab_dir, lab_rx) in enumerate([train, *extra_train]):
            if i > 0 and not (root / img_dir).is_dir():
                continue
            images = match_files(require_dir(root / img_dir, dataset), img_rx, ".nii.gz")
            labs = match_files(require_dir(root / lab_dir, dataset), lab_rx, ".nii.gz")
            paired, _ = pair_by_identifier(images, labs)
            for k in paired:
                if keep(k):
                    w.add_case(identifier(k), [images[k]], labs[k])
        if labelled_test is not None and (root / labelled_test[0]).is_dir():
            img_dir, img_rx, lab_dir, lab_rx = labelled_test
            images = match_files(root / img_dir, img_rx, ".nii.gz")
            labs = match_files(require_dir(root / lab_dir, dataset), lab_rx, ".nii.gz") \
                if (root / lab_dir).is_dir() else {}
            paired, unlabelled = pair_by_identifier(images, labs, images_without_label="test")
            for k in paired:
                if keep(k):
                    w.add_case(identifier(k), [images[k]], labs[k], test=True)
            for k in unlabelled:
                if keep(k):
                    w.add_case(identifier(k), [images[k]], test=True)
        if test is not None and (root / test[0]).is_dir():
            images = match_files(root / test[0], test[1], ".nii.gz")
            for k in sorted(images):
                if keep(k):
                    w.add_case(identifier(k), [images[k]], test=True)
        path = w.finish(dataset_name=dataset, reference=lm.get("source", ""),
                        official_label_names=lm["official_names"], **dataset_json_extra)
        report(path, w)
    return path


def convert_case_folders(*, dataset: str, label_map_name: str, root: Path, output_id: int, name: str,
                         overwrite: bool, labels: Optional[Mapping] = None, image_name: str = "imaging.nii.gz",
                         label_name: str = "segmentation.nii.gz", **dataset_json_extra) -> Path:
    """The KiTS layout ``root/case_XXXXX/{imaging,segmentation}.nii.gz``. Cases with a segmentation are training
    cases, cases without one go to imagesTs; a segmentation without imaging raises CIMISError.

    ``labels``: the dataset.json labels to write (default: the label map's plain labels); label files are checked
    against the label map's values either way.
    """
    lm = load_label_map(label_map_name)
    images, labs = collect_case_folders(root, image_name, label_name)
    paired, unlabelled = pair_by_identifier(images, labs, images_without_label="test")
    with RawDatasetWriter(output_id, name, dataset, labels or lm["labels"], {0: "CT"},
                          allowed_values=label_values(lm["labels"]), overwrite=overwrite) as w:
        for k in paired:
            w.add_case(k, [images[k]], labs[k])
        for k in unlabelled:
            w.add_case(k, [images[k]], test=True)
        path = w.finish(dataset_name=dataset, reference=lm.get("source", ""),
                        official_label_names=lm["official_names"], **dataset_json_extra)
        report(path, w)
    return path

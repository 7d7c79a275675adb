"""DSAD (Dresden Surgical Anatomy Dataset): 2D laparoscopic RGB frames, one binary mask per structure per frame.

Layout of the download (figshare 21702600), 32 surgeries ``01``..``32``::

    multilabel/<surgery>/image00.png  multilabel/<surgery>/mask00_<structure>.png   (one mask per structure)
    <structure>/<surgery>/image00.png  <structure>/<surgery>/mask00.png             (one structure per frame)

with ``<structure>`` among abdominal_wall, colon, inferior_mesenteric_artery, intestinal_veins, liver, pancreas,
small_intestine, spleen, stomach, ureter, vesicular_glands. Masks are 8-bit PNG with values {0, 255} (or {0, 1}).

Each frame becomes one nnU-Net 2D case ``DSAD_<source>_<surgery>_<frame>`` (image ``_0000.png``, RGB, read by
nnU-Net's NaturalImage2DIO), its masks merged into one label map (values: ``label_maps/dsad.json``, 1..11 in the
order above) by this rule, pixel by pixel:

- covered by exactly one annotated mask: that structure;
- covered by two or more masks (``--overlap``): ``ignore`` (default; the annotation contradicts itself there)
  or ``priority`` (the structure with the lowest value wins);
- covered by no mask: background if every structure was annotated in this frame; otherwise
  (``--unannotated``) ``ignore`` (default: the pixel may belong to a structure nobody drew in this frame) or
  ``background`` (the class-incremental convention: unlabelled = background, accepting the background shift).

``ignore`` is nnU-Net's ignore label (value 12, the highest, named "ignore"); it is listed in dataset.json only
if some pixel uses it. ``--source multilabel`` (default) reads the fully annotated multilabel folder, ``single``
the single-structure folders (one structure annotated per frame), ``all`` both.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .common import (RawDatasetWriter, find_root, load_label_map, make_parser, read_grid,
                                       read_label_array, report, require_dir)
from nnunetv2_cimis.errors import CIMISError, cli_entry

DATASET = "DSAD"
LAYOUT = "multilabel/<surgery>/imageXX.png + maskXX_<structure>.png; <structure>/<surgery>/imageXX.png + maskXX.png"
SOURCES = ("multilabel", "single", "all")
OVERLAP_RULES = ("ignore", "priority")
UNANNOTATED_RULES = ("ignore", "background")
_IMAGE_RX = re.compile(r"image(\d+)\.png")


def structures() -> Dict[str, int]:
    """Folder name of each structure (``abdominal_wall``) -> its label value."""
    lm = load_label_map("dsad")
    return {off: int(v) for v, off in lm["official_names"].items()}


def read_mask(path: Path, shape) -> np.ndarray:
    """A binary mask as bool (H, W). Raises CIMISError for other values, colour masks or a wrong size."""
    m = read_label_array(path)
    if m.ndim == 3:  # a grey mask saved as RGB(A): all colour channels must agree
        if not all(np.array_equal(m[..., 0], m[..., c]) for c in range(1, min(m.shape[2], 3))):
            raise CIMISError(f"mask {path} is a colour image; DSAD masks are binary")
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise CIMISError(f"mask {path} has size {m.shape[::-1]} (width, height), its image {tuple(shape)[::-1]}")
    values = np.unique(m)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise CIMISError(f"mask {path} holds value(s) {values.tolist()}; a DSAD mask holds 0 and 255 (or 0 and 1)")
    return m > 0


def check_rgb(path: Path) -> None:
    """DSAD frames are RGB; anything else would not match the dataset's three channels (CIMISError)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as e:
        raise CIMISError(f"cannot read {path}: {e}") from None
    if mode != "RGB":
        raise CIMISError(f"image {path} has PIL mode {mode!r}; DSAD frames are RGB")


def merge_masks(masks: Dict[int, np.ndarray], num_structures: int, ignore_value: int,
                overlap: str = "ignore", unannotated: str = "ignore") -> np.ndarray:
    """Merge binary masks (label value -> bool (H, W)) of the structures annotated in one frame into a label map.

    The rule is the module's (see its docstring). ``num_structures``: how many structures the dataset has, to
    tell whether every structure was annotated. Returns uint8 (H, W).
    """
    if overlap not in OVERLAP_RULES or unannotated not in UNANNOTATED_RULES:
        raise CIMISError(f"overlap must be one of {OVERLAP_RULES}, unannotated one of {UNANNOTATED_RULES}")
    if not masks:
        raise ValueError("no mask to merge")
    shape = next(iter(masks.values())).shape
    count = np.zeros(shape, dtype=np.int32)
    out = np.zeros(shape, dtype=np.uint8)
    for value in sorted(masks, reverse=True):  # lowest value written last: wins under "priority"
        out[masks[value]] = value
        count += masks[value]
    if overlap == "ignore":
        out[count > 1] = ignore_value
    if len(masks) < num_structures and unannotated == "ignore":
        out[count == 0] = ignore_value
    return out


def _frames(folder: Path) -> Dict[str, Path]:
    """Frame number -> imageXX.png of one surgery folder."""
    return {_IMAGE_RX.fullmatch(p.name).group(1): p for p in sorted(folder.iterdir()) if _IMAGE_RX.fullmatch(p.name)}


def _surgeries(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def collect_multilabel(folder: Path, known: Dict[str, int]):
    """Yield (identifier, image, {value: mask file}) for the multilabel folder. Raises CIMISError for a mask
    without image, a mask of an unknown structure, or an image without any mask."""
    rx = re.compile(r"mask(\d+)_(\w+)\.png")
    for s in _surgeries(folder):
        images = _frames(s)
        masks: Dict[str, Dict[int, Path]] = {}
        for p in sorted(s.glob("mask*.png")):
            m = rx.fullmatch(p.name)
            if m is None:
                raise CIMISError(f"unexpected file {p}: multilabel masks are named maskXX_<structure>.png")
            frame, structure = m.groups()
            if structure not in known:
                raise CIMISError(f"mask {p} names an unknown structure {structure!r}; known: {sorted(known)}")
            if frame not in images:
                raise CIMISError(f"mask {p} has no image (expected {s / f'image{frame}.png'})")
            masks.setdefault(frame, {})[known[structure]] = p
        for frame, image in sorted(images.items()):
            if frame not in masks:
                raise CIMISError(f"image {image} has no mask (expected mask{frame}_<structure>.png)")
            yield f"DSAD_multilabel_{s.name}_{frame}", image, masks[frame]


def collect_single(root: Path, known: Dict[str, int]):
    """Yield (identifier, image, {value: mask file}) for the single-structure folders."""
    found = False
    for structure, value in sorted(known.items(), key=lambda kv: kv[1]):
        folder = root / structure
        if not folder.is_dir():
            continue
        found = True
        for s in _surgeries(folder):
            images = _frames(s)
            for p in sorted(s.glob("mask*.png")):
                m = re.fullmatch(r"mask(\d+)\.png", p.name)
                if m is None:
                    raise CIMISError(f"unexpected file {p}: masks of {structure}/ are named maskXX.png")
                if m.group(1) not in images:
                    raise CIMISError(f"mask {p} has no image (expected {s / f'image{m.group(1)}.png'})")
            for frame, image in sorted(images.items()):
                mask = s / f"mask{frame}.png"
                if not mask.is_file():
                    raise CIMISError(f"image {image} has no mask (expected {mask})")
                yield f"DSAD_{structure}_{s.name}_{frame}", image, {value: mask}
    if not found:
        raise CIMISError(f"no single-structure folder ({', '.join(sorted(known))}) in {root}")


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False, source: str = "multilabel",
            overlap: str = "ignore", unannotated: str = "ignore") -> Path:
    """Convert the unpacked DSAD download (see the module docstring for the merge rule). Raises CIMISError."""
    if source not in SOURCES:
        raise CIMISError(f"source must be one of {SOURCES}, got {source!r}")
    if overlap not in OVERLAP_RULES or unannotated not in UNANNOTATED_RULES:
        raise CIMISError(f"overlap must be one of {OVERLAP_RULES}, unannotated one of {UNANNOTATED_RULES}")
    known = structures()
    lm = load_label_map("dsad")
    ignore_name, ignore_value = lm["ignore_label"]["name"], int(lm["ignore_label"]["value"])
    if source == "single":  # collect_single says so if no structure folder is there
        root = find_root(input_folder, [], ["DSAD", ""], DATASET)
    else:
        root = find_root(input_folder, ["multilabel"], ["", "DSAD"], DATASET)
    cases = []
    if source in ("multilabel", "all"):
        cases += list(collect_multilabel(require_dir(root / "multilabel", DATASET), known))
    if source in ("single", "all"):
        cases += list(collect_single(root, known))
    plain = dict(lm["labels"])
    used_ignore = False
    with RawDatasetWriter(output_id, name, DATASET, plain, {0: "R", 1: "G", 2: "B"}, file_ending=".png",
                          allowed_values=list(plain.values()) + [ignore_value], overwrite=overwrite,
                          files_per_case=1) as w:
        for identifier, image, mask_files in cases:
            check_rgb(image)
            grid = read_grid(image)
            masks = {v: read_mask(p, grid.shape[::-1]) for v, p in mask_files.items()}
            label = merge_masks(masks, len(known), ignore_value, overlap, unannotated)
            used_ignore |= bool((label == ignore_value).any())
            w.add_case(identifier, [image], label_array=label,
                       label_source=f"the masks of {image} ({', '.join(p.name for p in mask_files.values())})")
        if used_ignore:
            w.labels[ignore_name] = ignore_value
        path = w.finish(dataset_name=DATASET, reference=lm["source"], official_label_names=lm["official_names"],
                        overwrite_image_reader_writer="NaturalImage2DIO",
                        dsad_merge_rule={"source": source, "overlap": overlap, "unannotated": unannotated})
        report(path, w)
    return path


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = make_parser("nnUNetv2_cimis_convert_dsad", DATASET, LAYOUT, DATASET)
    p.add_argument("--source", choices=SOURCES, default="multilabel",
                   help="multilabel folder (default), single-structure folders, or all")
    p.add_argument("--overlap", choices=OVERLAP_RULES, default="ignore",
                   help="pixels in two or more masks: ignore label (default) or lowest label value wins")
    p.add_argument("--unannotated", choices=UNANNOTATED_RULES, default="ignore",
                   help="pixels in no mask of a frame where some structure was not annotated: ignore (default) "
                        "or background")
    args = p.parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite, args.source, args.overlap, args.unannotated)


if __name__ == "__main__":
    main()

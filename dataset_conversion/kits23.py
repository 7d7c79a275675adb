"""KiTS23 (2023 Kidney and Kidney Tumor Segmentation challenge): kidney (1), tumor (2), cyst (3), CT.

Layout of the ``kits23`` repository after ``kits23_download_data``::

    dataset/case_00000/imaging.nii.gz  dataset/case_00000/segmentation.nii.gz  (dataset/case_*/instances/ unused)

Two forms of dataset.json ``labels`` (the label files are the same, values 1-3):

- ``--form regions`` (default, as nnU-Net's Dataset220_KiTS2023): the challenge's nested evaluation classes
  ``kidney`` = {1, 2, 3}, ``masses`` = {2, 3}, ``tumor`` = {2}, with ``regions_class_order`` (1, 3, 2).
  This is what the KiTS23 leaderboard scores; nnU-Net trains with sigmoid outputs per region.
- ``--form labels``: plain exclusive classes ``kidney`` 1, ``tumor`` 2, ``cyst`` 3 (softmax). Use this form for
  class-incremental scenarios: a step adds classes, and regions that contain later classes cannot be split
  into steps (``kidney`` would need tumor and cyst voxels at step 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_case_folders, find_root, load_label_map, make_parser
from nnunetv2_cimis.errors import CIMISError, cli_entry

DATASET = "KiTS23"
LAYOUT = "dataset/case_XXXXX/imaging.nii.gz + segmentation.nii.gz"
FORMS = ("regions", "labels")


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False,
            form: str = "regions") -> Path:
    """Convert the KiTS23 dataset folder; ``form`` is ``"regions"`` or ``"labels"`` (see the module docstring).
    Returns the nnU-Net raw dataset folder. Raises CIMISError."""
    if form not in FORMS:
        raise CIMISError(f"form must be one of {FORMS}, got {form!r}")
    root = find_root(input_folder, [], ["", "dataset", "kits23/dataset"], DATASET, glob="case_*")
    extra = {"overwrite_image_reader_writer": "NibabelIOWithReorient", "kits23_form": form}
    labels = None
    if form == "regions":
        regions = load_label_map("kits23")["regions"]
        labels = {k: tuple(v) if isinstance(v, list) else v for k, v in regions["labels"].items()}
        extra["regions_class_order"] = tuple(regions["regions_class_order"])
    return convert_case_folders(dataset=DATASET, label_map_name="kits23", root=root, output_id=output_id,
                                name=name, overwrite=overwrite, labels=labels, **extra)


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = make_parser("nnUNetv2_cimis_convert_kits23", DATASET, LAYOUT, DATASET)
    p.add_argument("--form", choices=FORMS, default="regions",
                   help="regions: nested kidney/masses/tumor as nnU-Net and the challenge use (default); "
                        "labels: plain kidney/tumor/cyst for class-incremental scenarios")
    args = p.parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite, args.form)


if __name__ == "__main__":
    main()

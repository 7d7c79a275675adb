"""FLARE21 (MICCAI 2021 Fast and Low GPU memory Abdominal oRgan sEgmentation): liver, kidney, spleen, pancreas.

Layout of the download::

    TrainingImg/train_000_0000.nii.gz   TrainingMask/train_000.nii.gz   ValidationImg/validation_001_0000.nii.gz

Cases become ``FLARE21_train_000``; validation images (no public labels) go to imagesTs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_paired_folders, find_root, make_parser
from nnunetv2_cimis.errors import cli_entry

DATASET = "FLARE21"
LAYOUT = "TrainingImg/train_XXX_0000.nii.gz, TrainingMask/train_XXX.nii.gz, ValidationImg/ (optional)"


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False) -> Path:
    """Convert the unpacked FLARE21 download; returns the nnU-Net raw dataset folder. Raises CIMISError."""
    root = find_root(input_folder, ["TrainingImg", "TrainingMask"], ["", "FLARE21"], DATASET)
    return convert_paired_folders(
        dataset=DATASET, label_map_name="flare21", root=root, output_id=output_id, name=name, overwrite=overwrite,
        train=("TrainingImg", r"(train_\d{3})_0000\.nii\.gz", "TrainingMask", r"(train_\d{3})\.nii\.gz"),
        test=("ValidationImg", r"(validation_\d{3})_0000\.nii\.gz"), identifier=lambda k: f"FLARE21_{k}")


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser("nnUNetv2_cimis_convert_flare21", DATASET, LAYOUT, DATASET).parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): 13 organs, CT.

Layout of ``RawData.zip`` (Synapse syn3193805)::

    RawData/Training/img/img0001.nii.gz     RawData/Training/label/label0001.nii.gz
    RawData/Testing/img/img0061.nii.gz      (no labels)

Cases become ``BTCV_0001`` (training) and ``BTCV_0061`` (imagesTs). ``--input`` is the folder holding
``RawData`` or ``RawData`` itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_paired_folders, find_root, make_parser
from nnunetv2_cimis.errors import cli_entry

DATASET = "BTCV"
LAYOUT = "RawData/Training/img/imgXXXX.nii.gz, RawData/Training/label/labelXXXX.nii.gz, RawData/Testing/img/"


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False) -> Path:
    """Convert the unpacked BTCV download; returns the nnU-Net raw dataset folder. Raises CIMISError."""
    root = find_root(input_folder, ["Training/img", "Training/label"], ["", "RawData", "Abdomen/RawData"], DATASET)
    return convert_paired_folders(
        dataset=DATASET, label_map_name="btcv", root=root, output_id=output_id, name=name, overwrite=overwrite,
        train=("Training/img", r"img(\d{4})\.nii\.gz", "Training/label", r"label(\d{4})\.nii\.gz"),
        test=("Testing/img", r"img(\d{4})\.nii\.gz"), identifier=lambda k: f"BTCV_{k}")


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser("nnUNetv2_cimis_convert_btcv", DATASET, LAYOUT, DATASET).parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

"""WORD (Whole abdominal ORgan Dataset, V0.1.0): 16 organs, CT.

Layout of ``WORD-V0.1.0``::

    imagesTr/word_0002.nii.gz  labelsTr/word_0002.nii.gz     (100 training cases)
    imagesVal/ labelsVal/                                    (20 validation cases)
    imagesTs/  labelsTs/                                     (30 test cases)

Training and validation cases form imagesTr/labelsTr (nnU-Net's cross-validation replaces the fixed validation
split); the test cases keep their labels in imagesTs/labelsTs (held-out set for continual evaluation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_paired_folders, find_root, make_parser
from nnunetv2_cimis.errors import cli_entry

DATASET = "WORD"
LAYOUT = "imagesTr/word_XXXX.nii.gz, labelsTr/word_XXXX.nii.gz, imagesVal/, labelsVal/, imagesTs/, labelsTs/"
_RX = r"(word_\d{4})\.nii\.gz"


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False) -> Path:
    """Convert the unpacked WORD download; returns the nnU-Net raw dataset folder. Raises CIMISError."""
    root = find_root(input_folder, ["imagesTr", "labelsTr"], ["", "WORD-V0.1.0"], DATASET)
    return convert_paired_folders(
        dataset=DATASET, label_map_name="word", root=root, output_id=output_id, name=name, overwrite=overwrite,
        train=("imagesTr", _RX, "labelsTr", _RX), extra_train=[("imagesVal", _RX, "labelsVal", _RX)],
        labelled_test=("imagesTs", _RX, "labelsTs", _RX))


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser("nnUNetv2_cimis_convert_word", DATASET, LAYOUT, DATASET).parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

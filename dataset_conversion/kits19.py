"""KiTS19 (2019 Kidney Tumor Segmentation challenge): kidney (1) and tumor (2), CT.

Layout of the ``kits19`` repository after ``get_imaging``::

    data/case_00000/imaging.nii.gz  data/case_00000/segmentation.nii.gz   (cases 0-209)
    data/case_00210/imaging.nii.gz                                         (test cases, no segmentation)

Cases keep their folder names (``case_00000``); cases without segmentation go to imagesTs. The files are read
with nnU-Net's ``NibabelIOWithReorient`` as nnU-Net's own KiTS converter does (KiTS affines are not RAS).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_case_folders, find_root, make_parser
from nnunetv2_cimis.errors import cli_entry

DATASET = "KiTS19"
LAYOUT = "data/case_XXXXX/imaging.nii.gz + segmentation.nii.gz"


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False) -> Path:
    """Convert the KiTS19 data folder; returns the nnU-Net raw dataset folder. Raises CIMISError."""
    root = find_root(input_folder, [], ["", "data", "kits19/data"], DATASET, glob="case_*")
    return convert_case_folders(dataset=DATASET, label_map_name="kits19", root=root, output_id=output_id,
                                name=name, overwrite=overwrite,
                                overwrite_image_reader_writer="NibabelIOWithReorient")


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser("nnUNetv2_cimis_convert_kits19", DATASET, LAYOUT, DATASET).parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

"""FLARE22 (MICCAI 2022 FLARE): 13 abdominal organs, CT; the 50 labelled cases are already nnU-Net-named.

Layout of the download (``FLARE22Train`` or ``Training/FLARE22_LabeledCase50``)::

    images/FLARE22_Tr_0001_0000.nii.gz   labels/FLARE22_Tr_0001.nii.gz

Cases keep their names (``FLARE22_Tr_0001``). The unlabelled cases of the challenge are not converted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import convert_paired_folders, find_root, make_parser
from nnunetv2_cimis.errors import cli_entry

DATASET = "FLARE22"
LAYOUT = "images/FLARE22_Tr_XXXX_0000.nii.gz, labels/FLARE22_Tr_XXXX.nii.gz"


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False) -> Path:
    """Convert the unpacked FLARE22 labelled cases; returns the nnU-Net raw dataset folder. Raises CIMISError."""
    root = find_root(input_folder, ["images", "labels"], ["", "FLARE22Train", "Training/FLARE22_LabeledCase50"],
                     DATASET)
    return convert_paired_folders(
        dataset=DATASET, label_map_name="flare22", root=root, output_id=output_id, name=name, overwrite=overwrite,
        train=("images", r"(FLARE22_Tr_\d{4})_0000\.nii\.gz", "labels", r"(FLARE22_Tr_\d{4})\.nii\.gz"))


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser("nnUNetv2_cimis_convert_flare22", DATASET, LAYOUT, DATASET).parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

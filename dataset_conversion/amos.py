"""AMOS 2022 (Abdominal Multi-Organ Segmentation): 15 organs, CT (ids <= 500) and MRI (ids > 500).

Layout of ``amos22`` (zenodo record 7262581)::

    imagesTr/amos_0001.nii.gz  labelsTr/amos_0001.nii.gz
    imagesVa/ labelsVa/        (labelled validation cases, released after the challenge)
    imagesTs/                  (no public labels)
    dataset.json

``--modality ct`` (default) keeps CT cases, ``mri`` the MRI cases (z-score normalisation), ``all`` both (channel
name "CT_MRI", i.e. z-score normalisation as well, since nnU-Net's CT normalisation would be wrong for MRI).
Labelled validation cases join the training cases, as in nnU-Net's own AMOS converters. Class names follow
this package's vocabulary: AMOS's "arota" is written "aorta", "postcava" "inferior vena cava", "gall bladder"
"gallbladder" (the official spellings are kept in dataset.json ``official_label_names``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .common import convert_paired_folders, find_root, load_label_map, make_parser
from nnunetv2_cimis.errors import CIMISError, cli_entry

DATASET = "AMOS"
LAYOUT = "imagesTr/amos_XXXX.nii.gz, labelsTr/, imagesVa/, labelsVa/, imagesTs/, dataset.json"
MODALITIES = {"ct": "CT", "mri": "MRI", "all": "CT_MRI"}
#: Highest case id of the CT scans; MRI scans have larger ids.
LAST_CT_ID = 500
_RX = r"amos_(\d{4})\.nii\.gz"


def _check_source_labels(root: Path) -> None:
    """If the download's dataset.json is there, its label names must be AMOS's (catches a wrong --input)."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        src = json.loads(path.read_text(encoding="utf-8"))["labels"]
    except (ValueError, KeyError) as e:
        raise CIMISError(f"{path} is not AMOS's dataset.json (no readable 'labels': {e})") from None
    official = load_label_map("amos")["official_names"]
    got = {str(k): str(v).lower() for k, v in src.items() if str(k) != "0"}
    want = {k: v.lower() for k, v in official.items()}
    if got != want:
        raise CIMISError(f"{path} lists labels {got}, AMOS has {want}; is --input the AMOS download?")


def convert(input_folder, output_id: int, name: str = DATASET, overwrite: bool = False,
            modality: str = "ct") -> Path:
    """Convert the unpacked AMOS download, keeping ``modality`` (ct / mri / all) cases. Raises CIMISError."""
    if modality not in MODALITIES:
        raise CIMISError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    root = find_root(input_folder, ["imagesTr", "labelsTr"], ["", "amos22"], DATASET)
    _check_source_labels(root)

    def keep(key: str) -> bool:
        is_ct = int(key) <= LAST_CT_ID
        return modality == "all" or (modality == "ct") == is_ct

    return convert_paired_folders(
        dataset=DATASET, label_map_name="amos", root=root, output_id=output_id, name=name, overwrite=overwrite,
        train=("imagesTr", _RX, "labelsTr", _RX), extra_train=[("imagesVa", _RX, "labelsVa", _RX)],
        test=("imagesTs", _RX), identifier=lambda k: f"amos_{k}", keep=keep,
        channel_names={0: MODALITIES[modality]}, amos_modality=modality)


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = make_parser("nnUNetv2_cimis_convert_amos", DATASET, LAYOUT, DATASET)
    p.add_argument("--modality", choices=sorted(MODALITIES), default="ct",
                   help=f"ct: ids <= {LAST_CT_ID} (default); mri: ids > {LAST_CT_ID}; all: both")
    args = p.parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite, args.modality)


if __name__ == "__main__":
    main()

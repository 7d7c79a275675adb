"""Medical Segmentation Decathlon: any of its ten tasks (or a task laid out the same way).

Layout of a task tarball, e.g. ``Task01_BrainTumour``::

    dataset.json  imagesTr/BRATS_001.nii.gz  labelsTr/BRATS_001.nii.gz  imagesTs/BRATS_485.nii.gz

Multi-modal images are 4D NIfTI files; they are split into one file per channel with nnU-Net's own
``nnunetv2.dataset_conversion.convert_MSD_dataset.split_4d_nifti`` (3D images are copied). Channel names come
from the task's ``modality`` list, class names and values from its ``labels`` (checked against
``label_maps/msd.json`` for the ten official tasks). Hidden files (``._*`` from macOS tarballs) are skipped as
nnU-Net does. The dataset name defaults to the task's name (``Spleen`` for ``Task09_Spleen``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .common import (RawDatasetWriter, find_root, list_files, load_label_map, make_parser,
                                       pair_by_identifier, report)
from nnunetv2_cimis.errors import CIMISError, cli_entry

DATASET = "MSD"
LAYOUT = "TaskXX_Name/dataset.json, imagesTr/<case>.nii.gz (3D or 4D), labelsTr/<case>.nii.gz, imagesTs/"


def read_task(root: Path) -> Tuple[str, dict, dict]:
    """Task folder name, channel_names and labels (name -> value) of an MSD task, from its dataset.json.

    Raises CIMISError for a missing / unreadable dataset.json or labels that differ from the official ones."""
    path = root / "dataset.json"
    try:
        src = json.loads(path.read_text(encoding="utf-8"))
        channel_names = {str(k): v for k, v in src["modality"].items()}
        labels = {v: int(k) for k, v in src["labels"].items()}
    except FileNotFoundError:
        raise CIMISError(f"{path} is missing: an MSD task folder holds dataset.json") from None
    except (ValueError, KeyError, AttributeError) as e:
        raise CIMISError(f"{path} is not an MSD dataset.json (needs 'modality' and 'labels'): {e}") from None
    task = root.name
    known = load_label_map("msd")["tasks"].get(task)
    if known is not None and known["labels"] != labels:
        raise CIMISError(f"{path} lists labels {labels}, the official {task} has {known['labels']}")
    return task, channel_names, labels


def convert(input_folder, output_id: int, name: Optional[str] = None, overwrite: bool = False) -> Path:
    """Convert one unpacked MSD task folder (``TaskXX_Name``); returns the nnU-Net raw dataset folder.
    Raises CIMISError."""
    root = find_root(input_folder, ["dataset.json", "imagesTr", "labelsTr"], [""], "an MSD task")
    task, channel_names, labels = read_task(root)
    m = re.fullmatch(r"Task\d+_(\w+)", task)
    name = name or (m.group(1) if m else task)
    images = {p.name[:-7]: p for p in list_files(root / "imagesTr", ".nii.gz")}
    labs = {p.name[:-7]: p for p in list_files(root / "labelsTr", ".nii.gz")}
    paired, _ = pair_by_identifier(images, labs)
    with RawDatasetWriter(output_id, name, f"MSD {task}", labels, channel_names, overwrite=overwrite) as w:
        for k in paired:
            w.add_case(k, image_4d=images[k], label_file=labs[k])
        if (root / "imagesTs").is_dir():
            for p in list_files(root / "imagesTs", ".nii.gz"):
                w.add_case(p.name[:-7], image_4d=p, test=True)
        path = w.finish(dataset_name=task, reference="http://medicaldecathlon.com/", msd_task=task)
        report(path, w)
    return path


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = make_parser("nnUNetv2_cimis_convert_msd", "a Medical Segmentation Decathlon task", LAYOUT, "<task name>")
    p.set_defaults(name=None)
    args = p.parse_args(argv)
    convert(args.input, args.output_id, args.name, args.overwrite)


if __name__ == "__main__":
    main()

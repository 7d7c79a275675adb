"""Challenge conventions: how a challenge names its input images and expects its predictions.

One row per challenge (:data:`CHALLENGES`): the label values (the dataset converter's label map in
``dataset_conversion/label_maps/``, i.e. the values the challenge's own label files use), how an input file
name gives the case identifier, and how the prediction of a case is named. Where each fact comes from:

========  =============================================  ======================================  ===================
name      inputs (case id from)                          outputs                                 labels
========  =============================================  ======================================  ===================
flare22   ``FLARE22_Ts_0001_0000.nii.gz`` (nnU-Net       ``FLARE22_Ts_0001.nii.gz``              1-13, flare22.json
          channel suffix; the download's images, see                                             (liver 1 ... left
          ``dataset_conversion/flare22.py``)                                                     kidney 13)
kits23    ``case_00000/imaging.nii.gz`` (the KiTS23      ``case_00000.nii.gz`` (the official     kidney 1, tumor 2,
          repository's layout, ``kits23.py``) or         test-phase interface is not in our      cyst 3, kits23.json
          ``case_00000.nii.gz``                          sources: the case name is kept)
kits19    ``case_00210/imaging.nii.gz`` or               ``prediction_00210.nii.gz``             kidney 1, tumor 2
          ``case_00210.nii.gz``                          (kits19.grand-challenge.org/rules)
btcv      ``img0061.nii.gz`` (``RawData/Testing/img``,   ``label0061.nii.gz``: the naming of     1-13, btcv.json
          ``btcv.py``)                                   the download's label files; the
                                                         official submission page is not in
                                                         our sources
amos      ``amos_0008.nii.gz`` (``imagesTs``,            ``amos_0008.nii.gz``                    1-15, amos.json
          ``amos.py``)                                   (amos22.grand-challenge.org/Evaluation)
word      ``word_0001.nii.gz`` (``imagesTs``,            ``word_0001.nii.gz``: the naming of     1-16, word.json
          ``word.py``)                                   the download's ``labelsTs``
========  =============================================  ======================================  ===================

FLARE's container interface (``docker container run ... -v inputs:/workspace/inputs -v
outputs:/workspace/outputs ... sh predict.sh``) is from FLARE 2021's evaluation page
(flare.grand-challenge.org/Evaluation); FLARE22's rules (flare22.grand-challenge.org/Rules) ask for a Docker
container as well. The template in ``docker/`` follows that interface. Labels are matched to a model's classes by name (:func:`canonical_class_name`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from nnunetv2_cimis.errors import CIMISError


@dataclass(frozen=True)
class ChallengeConvention:
    """One challenge's conventions (see the module docstring for the sources)."""

    name: str
    label_map: str  #: converter label map (dataset_conversion/label_maps/<label_map>.json)
    input_pattern: str  #: regex on a file name (or ``case_xxx/imaging.nii.gz`` path); group 1 = case id
    output_template: str  #: ``{case}`` and ``{number}`` (the case id's last run of digits)
    description: str
    source: str

    def output_name(self, case: str) -> str:
        digits = re.findall(r"\d+", case)
        return self.output_template.format(case=case, number=digits[-1] if digits else case)

    def labels(self) -> Dict[str, int]:
        """The challenge's class name -> value (background 0 included), from the converter's label map."""
        from nnunetv2_cimis.dataset_conversion.common import load_label_map
        return {str(k): int(v) for k, v in load_label_map(self.label_map)["labels"].items()}


_NNUNET_CHANNEL = r"(.+)_0000\.nii\.gz"
_KITS = r"(?:(case_\d{5})/imaging\.nii\.gz|(case_\d{5})\.nii\.gz)"

CHALLENGES: Dict[str, ChallengeConvention] = {c.name: c for c in (
    ChallengeConvention("flare22", "flare22", _NNUNET_CHANNEL, "{case}.nii.gz",
                        "MICCAI FLARE 2022: 13 abdominal organs, CT",
                        "labels: dataset_conversion/label_maps/flare22.json (flare22.grand-challenge.org); "
                        "container: FLARE21's flare.grand-challenge.org/Evaluation (FLARE22's rules ask for one)"),
    ChallengeConvention("kits23", "kits23", _KITS, "{case}.nii.gz",
                        "KiTS23: kidney, tumor, cyst, CT",
                        "labels and layout: github.com/neheller/kits23 (dataset_conversion/kits23.py); the "
                        "output name keeps the case name (official test interface not in our sources)"),
    ChallengeConvention("kits19", "kits19", _KITS, "prediction_{number}.nii.gz",
                        "KiTS19: kidney, tumor, CT",
                        "kits19.grand-challenge.org/rules: prediction_00210.nii.gz ..., 1 kidney, 2 tumor"),
    ChallengeConvention("btcv", "btcv", r"img(\d{4})\.nii\.gz", "label{number}.nii.gz",
                        "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault): 13 organs, CT",
                        "labels and file names: the RawData.zip download (dataset_conversion/btcv.py); the output "
                        "follows its label files labelXXXX.nii.gz"),
    ChallengeConvention("amos", "amos", r"(amos_\d{4})\.nii\.gz", "{case}.nii.gz",
                        "AMOS 2022: 15 organs, CT/MRI",
                        "amos22.grand-challenge.org/Evaluation: results/amos_xxxx.nii.gz; labels: "
                        "dataset_conversion/label_maps/amos.json"),
    ChallengeConvention("word", "word", r"(word_\d{4})\.nii\.gz", "{case}.nii.gz",
                        "WORD V0.1.0: 16 organs, CT",
                        "github.com/HiLab-git/WORD layout (dataset_conversion/word.py): labelsTs/word_XXXX.nii.gz"),
)}


def get_convention(name: str) -> ChallengeConvention:
    key = name.strip().lower()
    if key not in CHALLENGES:
        raise CIMISError(f"unknown challenge {name!r}; known: {', '.join(sorted(CHALLENGES))}")
    return CHALLENGES[key]


#: spellings that name the same structure (phantom and converter vocabularies)
_ALIASES = {"kidney right": "right kidney", "kidney left": "left kidney", "gall bladder": "gallbladder",
            "arota": "aorta", "postcava": "inferior vena cava", "adrenal": "adrenal gland",
            "kidney tumor": "tumor", "kidney cyst": "cyst"}


def canonical_class_name(name: str) -> str:
    """Lower case, ``_`` as space, single spaces, known aliases resolved (``kidney_right`` -> ``right kidney``)."""
    n = " ".join(str(name).replace("_", " ").lower().split())
    return _ALIASES.get(n, n)


def find_inputs(folder: str, convention: Optional[ChallengeConvention], file_ending: str,
                num_channels: int) -> List[Tuple[str, List[str]]]:
    """The cases in ``folder``: ``[(case id, [channel files])]``, sorted by case id.

    Without a convention the folder follows nnU-Net's naming (``CASE_0000<ending>``, ``CASE_0001<ending>``, ...).
    With one, a file (or ``case_xxx/imaging.nii.gz`` folder) matching its input pattern is one single-channel
    case. Raises CIMISError when nothing matches, or a case lacks a channel.
    """
    from nnunetv2_cimis.naming import check_case_identifier
    if not os.path.isdir(folder):
        raise CIMISError(f"-i {folder} is not a folder")
    cases: Dict[str, List[str]] = {}
    if convention is None:
        rx = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
        found: Dict[str, Dict[int, str]] = {}
        for f in sorted(os.listdir(folder)):
            m = rx.fullmatch(f)
            if m and not f.startswith("."):
                found.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
        for case, channels in found.items():
            missing = [c for c in range(num_channels) if c not in channels]
            if missing:
                raise CIMISError(f"case {case} in {folder} lacks channel file(s) "
                                 f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in missing)}")
            cases[case] = [channels[c] for c in range(num_channels)]
        if not cases:
            raise CIMISError(f"no input images named CASE_0000{file_ending} in {folder} (nnU-Net's naming); for a "
                             f"challenge's own naming pass --challenge")
    else:
        if num_channels != 1:
            raise CIMISError(f"the {convention.name} convention has one image per case but the model takes "
                             f"{num_channels} channels")
        rx = re.compile(convention.input_pattern)
        entries = []
        for f in sorted(os.listdir(folder)):
            if f.startswith("."):
                continue
            p = os.path.join(folder, f)
            if os.path.isdir(p):
                entries.append((f + "/imaging.nii.gz", os.path.join(p, "imaging.nii.gz")))
            else:
                entries.append((f, p))
        for rel, path in entries:
            m = rx.fullmatch(rel)
            if m and os.path.isfile(path):
                case = next(g for g in m.groups() if g)
                if case in cases:
                    raise CIMISError(f"case {case} occurs twice in {folder}")
                cases[case] = [path]
        if not cases:
            raise CIMISError(f"no input image in {folder} matches the {convention.name} naming "
                             f"({convention.input_pattern})")
    for case in cases:
        check_case_identifier(case, f"-i {folder}")
    return sorted(cases.items())

"""From the scenario's global label values back to the source dataset's values or a challenge's values.

Step datasets number classes 1..K in scenario order (``flare22:5-4-4`` makes FLARE22's left kidney 3, not 13).
``nnUNetv2_cimis_make_scenario`` records, per global value, the source dataset, the class name there and its
value (``source_labels`` in the step metadata and in the joint dataset's ``cimis_joint`` note);
``nnUNetv2_cimis_add_classes`` records the same for the classes it adds and carries the model's record forward.
A trained model folder holds a copy of its dataset.json, so the mapping travels with the model.

:func:`label_mapping` turns that into ``{global value: target value}`` for
``--labels global`` (identity), ``--labels source`` (the recorded source values) or a challenge
(class names matched to the challenge's label map).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from nnunetv2_cimis.errors import CIMISError

SOURCE_LABELS_KEY = "source_labels"


def model_labels(dataset_json: dict, where: str) -> Dict[int, str]:
    """The model's foreground classes: value -> name (plain integer labels only)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise CIMISError(f"{where}: dataset.json has no 'labels' object")
    out = {}
    for name, v in labels.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise CIMISError(f"{where}: label {name!r} is a region ({v}); the submission command maps plain "
                             f"integer labels only")
        if v != 0 and name != "ignore":
            out[v] = name
    return out


def recorded_source_labels(dataset_json: dict) -> Optional[Dict[int, dict]]:
    """``{global value: {"dataset", "name", "value"}}`` as recorded at scenario creation, or None."""
    for key in ("cimis", "cimis_joint"):
        block = dataset_json.get(key)
        if isinstance(block, dict) and isinstance(block.get(SOURCE_LABELS_KEY), dict):
            out = {}
            for k, entry in block[SOURCE_LABELS_KEY].items():
                try:
                    out[int(k)] = {"dataset": str(entry["dataset"]), "name": str(entry["name"]),
                                   "value": int(entry["value"])}
                except (KeyError, TypeError, ValueError):
                    raise CIMISError(f"the recorded source labels ({key}.{SOURCE_LABELS_KEY}) are malformed at "
                                     f"{k!r}; recreate the step dataset") from None
            return out
    return None


def _fallback_source_labels(dataset_json: dict, classes: Mapping[int, str]) -> Optional[Dict[int, dict]]:
    """Models made before ``source_labels`` was recorded: the step's single source dataset, found in
    ``nnUNet_raw``, classes matched by name."""
    block = dataset_json.get("cimis")
    if not isinstance(block, dict) or not block.get("source_dataset"):
        return None
    from nnunetv2_cimis.naming import check_dataset_folder
    from nnunetv2_cimis.safe_load import load_json_object
    src = check_dataset_folder(block["source_dataset"], "step metadata")
    raw = os.environ.get("nnUNet_raw")
    path = os.path.join(raw, src, "dataset.json") if raw else None
    if not path or not os.path.isfile(path):
        return None
    labels = load_json_object(path, f"dataset.json of the source dataset {src}").get("labels", {})
    if not all(name in labels and isinstance(labels[name], int) for name in classes.values()):
        return None
    return {v: {"dataset": src, "name": n, "value": int(labels[n])} for v, n in classes.items()}


def label_mapping(dataset_json: dict, target: str, where: str = "the model") -> Tuple[Dict[int, int], List[str]]:
    """``({model value: output value}, notes)`` for ``target`` = ``"global"``, ``"source"`` or a challenge name.

    Classes a challenge does not have become background (a note says which). Raises CIMISError when the
    source values are not recorded and cannot be found, or when two classes would get one value.
    """
    from nnunetv2_cimis.submission.conventions import canonical_class_name, get_convention
    classes = model_labels(dataset_json, where)
    notes: List[str] = []
    if target == "global":
        return {v: v for v in classes}, notes
    source = recorded_source_labels(dataset_json)
    if target == "source":
        if source is None:
            source = _fallback_source_labels(dataset_json, classes)
        if source is None:
            if "cimis" in dataset_json or "cimis_joint" in dataset_json:
                raise CIMISError(f"{where}: its dataset.json records no source label values (made before they were "
                                 f"recorded, and the source dataset is not in nnUNet_raw); use --labels global or "
                                 f"--challenge NAME")
            notes.append("the model has no step metadata: its own label values are the source values")
            return {v: v for v in classes}, notes
        missing = sorted(set(classes) - set(source))
        if missing:
            raise CIMISError(f"{where}: no source value recorded for class value(s) {missing}")
        datasets = sorted({source[v]["dataset"] for v in classes})
        mapping = {v: source[v]["value"] for v in classes}
        if len(set(mapping.values())) != len(mapping):
            raise CIMISError(f"{where}: the classes come from several source datasets ({', '.join(datasets)}) whose "
                             f"label values collide; use --labels global or --challenge NAME")
        return mapping, notes
    convention = get_convention(target)
    wanted = {canonical_class_name(n): v for n, v in convention.labels().items() if v != 0}
    mapping: Dict[int, int] = {}
    dropped = []
    for v, name in sorted(classes.items()):
        names = [name] + ([source[v]["name"]] if source and v in source else [])
        hit = next((wanted[canonical_class_name(n)] for n in names if canonical_class_name(n) in wanted), None)
        if hit is None:
            dropped.append(name)
            mapping[v] = 0
        else:
            mapping[v] = hit
    if dropped:
        notes.append(f"{convention.name} has no class {', '.join(dropped)}: written as background")
    used = [t for t in mapping.values() if t != 0]
    if len(set(used)) != len(used):
        raise CIMISError(f"{where}: two classes map to the same {convention.name} value ({mapping})")
    absent = sorted(set(wanted.values()) - set(used))
    if absent:
        names = {v: n for n, v in convention.labels().items()}
        notes.append(f"the model does not segment {convention.name} class(es) {', '.join(names[a] for a in absent)}")
    return mapping, notes


def apply_mapping(seg: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel ``seg`` (values not in ``mapping`` become 0) with a lookup table; the dtype fits the values."""
    top = max([int(seg.max(initial=0))] + list(mapping))
    lut = np.zeros(top + 1, dtype=np.int32)
    for a, b in mapping.items():
        lut[int(a)] = int(b)
    out = lut[seg.astype(np.int64)]
    return out.astype(np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16)

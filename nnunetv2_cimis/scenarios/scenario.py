"""Incremental scenarios: which classes are learned at which step.

A scenario is data: a list of steps, each a list of class names of the source dataset. It can be given as

* a split string in the dataset's label order, MiB/PLOP style: ``"4-4-5"`` = the first 4 classes at step 0,
  the next 4 at step 1, the next 5 at step 2 (fewer classes than the dataset has is allowed: the rest are
  not part of the scenario and become background);
* explicit class groups by label name: ``"liver,spleen;left kidney,right kidney"`` (``;`` between steps,
  ``,`` between classes) or a JSON list of lists;
* a preset name ``"<dataset>:<split>"`` (e.g. ``"btcv:4-4-5"``) from ``scenarios/presets/<dataset>.json``.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Sequence

from nnunetv2_cimis.errors import CIMISError

PRESET_FOLDER = os.path.join(os.path.dirname(__file__), "presets")
_SPLIT = re.compile(r"^\d+(-\d+)+$|^\d+$")


def load_presets() -> Dict[str, dict]:
    """All single-dataset presets as ``"<dataset>:<split>" -> {"steps": [...], ...}`` (lower-case dataset)."""
    presets = {}
    for path in sorted(glob.glob(os.path.join(PRESET_FOLDER, "*.json"))):
        with open(path) as f:
            content = json.load(f)
        if "dataset" not in content:  # sequences.json and other multi-dataset files
            continue
        for split, entry in content.get("scenarios", {}).items():
            presets[f"{content['dataset'].lower()}:{split}"] = entry
    return presets


def load_sequences() -> Dict[str, dict]:
    """Dataset-sequence presets (``presets/sequences.json``): name -> {"steps": [{"dataset", "classes",
    "rename"}...], "description"}."""
    path = os.path.join(PRESET_FOLDER, "sequences.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("scenarios", {})


def parse_scenario(spec: str, class_names: Sequence[str]) -> List[List[str]]:
    """Turn a scenario spec into class-name groups, one per step.

    Args:
        spec: split string, explicit groups, JSON list of lists, or preset name (see module docstring).
        class_names: the source dataset's foreground class names in label-value order.

    Raises:
        CIMISError: malformed spec, unknown class, a class twice, an empty step, more classes than exist,
            fewer than two steps.
    """
    spec = spec.strip()
    if not spec:
        raise CIMISError("The scenario is empty. Give a split such as '2-2-2' or class groups 'a,b;c'.")
    names = list(class_names)
    if spec.lower() in load_presets():
        groups = [list(g) for g in load_presets()[spec.lower()]["steps"]]
    elif ":" in spec and not spec.startswith("["):
        known = ", ".join(sorted(load_presets())) or "none installed"
        raise CIMISError(f"Unknown scenario preset {spec!r}. Known presets: {known}.")
    elif _SPLIT.match(spec):
        sizes = [int(s) for s in spec.split("-")]
        if any(s == 0 for s in sizes):
            raise CIMISError(f"Scenario {spec!r} has a step with 0 classes; every step must add at least one.")
        if sum(sizes) > len(names):
            raise CIMISError(f"Scenario {spec!r} needs {sum(sizes)} classes but the dataset has only {len(names)} "
                             f"({', '.join(names)}).")
        groups, start = [], 0
        for s in sizes:
            groups.append(names[start:start + s])
            start += s
    elif spec.startswith("["):
        try:
            groups = json.loads(spec)
        except json.JSONDecodeError as e:
            raise CIMISError(f"Scenario {spec!r} is not valid JSON ({e}).") from None
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise CIMISError(f"A JSON scenario must be a list of lists of class names, got {spec!r}.")
    elif re.fullmatch(r"[\d\-\s]+", spec):
        raise CIMISError(f"Malformed scenario {spec!r}: a split is numbers joined by '-', e.g. '4-4-5'.")
    else:
        groups = [[c.strip() for c in step.split(",")] for step in spec.split(";")]
    return validate_groups(groups, names, spec)


def validate_groups(groups: List[List[str]], names: Sequence[str], spec: str = "") -> List[List[str]]:
    if len(groups) < 2:
        raise CIMISError(f"Scenario {spec!r} has {len(groups)} step(s); an incremental scenario needs at least 2.")
    seen = set()
    for i, g in enumerate(groups):
        if not g or any(not isinstance(c, str) or not c for c in g):
            raise CIMISError(f"Step {i} of scenario {spec!r} is empty or has an empty class name.")
        for c in g:
            if c not in names:
                raise CIMISError(f"Scenario {spec!r} names class {c!r}, which the dataset does not have. Its classes: "
                                 f"{', '.join(names)}.")
            if c in seen:
                raise CIMISError(f"Scenario {spec!r} names class {c!r} twice; each class is learned at one step.")
            seen.add(c)
    return [list(g) for g in groups]


def scenario_label(spec: str, groups: List[List[str]]) -> str:
    """A short name for the scenario, recorded in the step metadata."""
    if _SPLIT.match(spec.strip()) or spec.strip().lower() in load_presets() or spec.strip() in load_sequences():
        return spec.strip()
    if spec.strip().endswith(".json"):
        return os.path.splitext(os.path.basename(spec.strip()))[0]
    return "-".join(str(len(g)) for g in groups)

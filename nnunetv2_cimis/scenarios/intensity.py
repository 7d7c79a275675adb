"""The CT intensity window of an incremental scenario.

nnU-Net's ``CTNormalization`` clips every CT image to the 0.5 and 99.5 percentiles of the **labelled
foreground** of the dataset it planned on and z-scores it with that foreground's mean and standard deviation
(``foreground_intensity_properties_per_channel`` in the plans). A scenario plans once, on step 0, and every
later step inherits the plans, so the window is that of step 0's organs only:

* too narrow when step 0 holds only similar organs: liver + spleen of a real portal-venous CT give about
  [-32, 77] HU and clip 15-19 % of the stomach's and pancreas' voxels that a later step must learn;
* too wide when a step-0 organ holds gas: the phantom's stomach air widens it to [-810, 188] HU, and the
  soft-tissue organs end up about 0.13 standard deviations apart.

Later steps are then blind to what the window removed. ``nnUNetv2_cimis_make_scenario`` therefore chooses the
window with ``--intensity-window``:

``all`` (default)
    nnU-Net's own rule (0.5-99.5 percentiles, mean, std) over the labelled foreground of **all** the scenario's
    training cases, i.e. of its joint dataset, the foreground a user who labelled everything would plan on.
    Documented choice: the window is a property of the modality and the anatomy, not of a step.
``step0``
    plain nnU-Net: the foreground of step 0 only.
``LOW,HIGH``
    a fixed window in the image's units (HU for CT), e.g. ``-150,250`` for abdominal soft tissue. The mean is
    the window's centre and the standard deviation a quarter of its width, so the window maps to [-2, 2]
    (documented choice; any linear map would do, nnU-Net's networks normalise every layer).

Only ``CTNormalization`` reads these properties; channels normalised per image (z-score) are not affected.
For a model trained elsewhere (``nnUNetv2_cimis_add_classes``) the window is fixed already;
:func:`clipped_fractions` measures how much of each new class it clips, and the command warns.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_cimis.errors import CIMISError

WindowSpec = Union[str, Tuple[float, float]]
#: share of a class's voxels outside the window above which a warning is given
CLIP_WARNING_FRACTION = 0.05


def parse_intensity_window(value: Union[str, Sequence[float], None]) -> WindowSpec:
    """``"all"``, ``"step0"`` or ``(low, high)`` from a command-line string such as ``"-150,250"``."""
    if value is None:
        return "all"
    if isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        text = str(value).strip()
        if text in ("all", "step0"):
            return text
        parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise CIMISError(f"--intensity-window takes 'all', 'step0' or 'LOW,HIGH' (e.g. -150,250), got {value!r}") \
            from None
    if not (np.isfinite(low) and np.isfinite(high)) or low >= high:
        raise CIMISError(f"--intensity-window LOW,HIGH needs finite LOW < HIGH, got {low}, {high}")
    return low, high


def fixed_window_properties(low: float, high: float) -> dict:
    """Intensity properties of one channel for a fixed window (see module docstring)."""
    centre, sd = (low + high) / 2.0, (high - low) / 4.0
    return {"max": high, "mean": centre, "median": centre, "min": low, "percentile_00_5": low,
            "percentile_99_5": high, "std": sd}


def set_intensity_properties(plans_file: str, properties: Mapping[str, dict]) -> None:
    """Write ``foreground_intensity_properties_per_channel`` into a plans file (plans are data)."""
    with open(plans_file) as f:
        plans = json.load(f)
    plans["foreground_intensity_properties_per_channel"] = {str(k): dict(v) for k, v in properties.items()}
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)


def ct_windows(plans: dict) -> Dict[int, Tuple[float, float]]:
    """Channel -> (low, high) for the channels of ``plans``' configurations normalised with CTNormalization."""
    props = plans.get("foreground_intensity_properties_per_channel", {})
    schemes = set()
    for cfg in plans.get("configurations", {}).values():
        for c, scheme in enumerate(cfg.get("normalization_schemes", []) or []):
            if scheme == "CTNormalization":
                schemes.add(c)
    out = {}
    for c in sorted(schemes):
        p = props.get(str(c))
        if p is not None:
            out[c] = (float(p["percentile_00_5"]), float(p["percentile_99_5"]))
    return out


def clipped_fractions(image_label_pairs: Sequence[Tuple[np.ndarray, np.ndarray]], classes: Sequence[int],
                      window: Tuple[float, float]) -> Dict[int, float]:
    """Share of each class's voxels whose intensity lies outside ``window``.

    Args:
        image_label_pairs: ``(image, label)`` arrays of equal shape (one channel).
        classes: label values to measure.
        window: ``(low, high)``.

    Returns:
        class -> fraction in [0, 1]; classes without voxels are left out.
    """
    low, high = window
    outside = {c: 0 for c in classes}
    total = {c: 0 for c in classes}
    for image, label in image_label_pairs:
        if image.shape != label.shape:
            raise CIMISError(f"image and label shapes differ: {image.shape} vs {label.shape}")
        for c in classes:
            v = image[label == c]
            total[c] += v.size
            outside[c] += int(((v < low) | (v > high)).sum())
    return {c: outside[c] / total[c] for c in classes if total[c] > 0}


def clipping_warnings(fractions: Mapping[int, float], names: Mapping[int, str], window: Tuple[float, float],
                      threshold: float = CLIP_WARNING_FRACTION) -> List[str]:
    """One warning line per class of which more than ``threshold`` is clipped."""
    return [f"WARNING: the model's CT window [{window[0]:.0f}, {window[1]:.0f}] clips {100 * f:.0f} % of the voxels "
            f"of the new class {names.get(c, c)!r}: the network sees them all at the window's edge and may not tell "
            f"them from other tissue. A scenario made with nnUNetv2_cimis_make_scenario --intensity-window all (or "
            f"a fixed LOW,HIGH window) plans a window that covers every class."
            for c, f in sorted(fractions.items()) if f > threshold]


def window_of_plans_file(plans_file: str) -> Optional[Tuple[float, float]]:
    """The CT window of channel 0, or None when channel 0 is not CT-normalised."""
    if not os.path.isfile(plans_file):
        return None
    with open(plans_file) as f:
        return ct_windows(json.load(f)).get(0)


def new_class_clipping(plans: dict, io, cases: Mapping[str, dict], class_values: Mapping[str, int]
                       ) -> Tuple[Dict[str, float], List[str]]:
    """How much of each new class the model's CT window clips, measured on the new dataset's cases.

    Args:
        plans: the model's plans (their window is what every later step sees).
        io: a :class:`~nnunetv2_cimis.scenarios.datasets.SegmentationIO` of the new dataset.
        cases: case id -> ``{"images": [...], "label": path}`` of the new dataset.
        class_values: new class name -> label value in the new dataset's label files.

    Returns:
        ``(fractions, warnings)``: class name -> clipped share of its voxels, and the warning lines (empty when
        channel 0 is not CT-normalised or nothing is clipped beyond :data:`CLIP_WARNING_FRACTION`).
    """
    window = ct_windows(plans).get(0)
    if window is None:
        return {}, []
    pairs = []
    for c in sorted(cases):
        image, _ = io.rw.read_images([cases[c]["images"][0]])
        label, _ = io.read(cases[c]["label"])
        pairs.append((np.asarray(image[0]), np.asarray(label)))
    by_value = clipped_fractions(pairs, list(class_values.values()), window)
    names = {v: n for n, v in class_values.items()}
    fractions = {names[v]: round(f, 4) for v, f in by_value.items()}
    return fractions, clipping_warnings(by_value, names, window)

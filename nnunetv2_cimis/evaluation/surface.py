"""Surface metrics through MONAI: normalised surface Dice (NSD) at a per-class tolerance in mm, and HD95.

Both come from ``monai.metrics`` (``compute_surface_dice``, ``compute_hausdorff_distance`` with
``percentile=95``), which extract the mask borders and compute the distance transforms themselves, with the
voxel spacing of the case. This module only builds the one-hot tensors and names the edge cases:

* a class absent from both reference and prediction: NSD and HD95 NaN (nothing to score; NaN is left out of
  means, as nnU-Net does for Dice);
* a class present in only one of them: NSD 0 (MONAI), HD95 NaN (MONAI: the distance to an empty surface is
  undefined); ``n_ref`` / ``n_pred`` in the summary say which case it is.

Reference: Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for radiotherapy",
JMIR 2021 (surface Dice at tolerance tau); FLARE, AMOS and KiTS score NSD / surface Dice.
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping, Sequence

import numpy as np

from nnunetv2_cimis.errors import CIMISError

DEFAULT_TOLERANCE_MM = 2.0


def parse_tolerances(values: Sequence[str], class_names: Mapping[int, str],
                     default: float = DEFAULT_TOLERANCE_MM) -> Dict[int, float]:
    """``--nsd-tolerance`` -> {class value: mm}. ``["3"]`` sets every class; ``["liver=5", "aorta=1.5"]`` (with an
    optional plain number first as the default) sets single classes by name. Raises CIMISError on bad input."""
    out = {v: float(default) for v in class_names}
    by_name = {n: v for v, n in class_names.items()}
    for item in values or []:
        name, sep, mm = str(item).rpartition("=")
        try:
            tol = float(mm)
        except ValueError:
            raise CIMISError(f"--nsd-tolerance {item!r}: give millimetres, e.g. 2 or liver=5") from None
        if not tol > 0:
            raise CIMISError(f"--nsd-tolerance {item!r}: the tolerance must be > 0 mm")
        if not sep:
            out = {v: tol for v in out}
        elif name in by_name:
            out[by_name[name]] = tol
        else:
            raise CIMISError(f"--nsd-tolerance {item!r}: no class {name!r} (classes: {', '.join(by_name)})")
    return out


def surface_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int],
                    tolerances_mm: Mapping[int, float], spacing: Sequence[float]) -> Dict[int, Dict[str, float]]:
    """``{label: {"NSD": ..., "HD95": ...}}`` for label maps of equal shape (any number of spatial axes).

    Args:
        reference, prediction: integer label maps, same shape, spatial axes only.
        labels: the class values to score.
        tolerances_mm: NSD tolerance per label, in mm.
        spacing: voxel size along each axis of the arrays, in mm.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    if reference.shape != prediction.shape:
        raise CIMISError(f"reference and prediction have different shapes {reference.shape} and {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise CIMISError(f"spacing {tuple(spacing)} does not fit arrays with {reference.ndim} axes")
    out: Dict[int, Dict[str, float]] = {}
    for lab in labels:
        r, p = reference == lab, prediction == lab
        if not r.any() and not p.any():
            out[int(lab)] = {"NSD": float("nan"), "HD95": float("nan")}
            continue
        # one-hot (batch 1, background + class) as MONAI expects; include_background=False scores the class
        y = torch.from_numpy(np.stack([~r, r])[None].astype(np.float32))
        y_pred = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
        sp = [float(s) for s in spacing]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty masks (handled above) and deprecations
            nsd = compute_surface_dice(y_pred, y, [float(tolerances_mm[lab])], include_background=False, spacing=sp)
            hd = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=sp)
        hd95 = float(hd.item())
        out[int(lab)] = {"NSD": float(nsd.item()), "HD95": hd95 if np.isfinite(hd95) else float("nan")}
    return out

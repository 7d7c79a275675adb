"""Synthetic 3D abdominal CT phantom, written as an nnU-Net raw dataset.

Each case is a body (subcutaneous fat ring around a mixed fat/bowel interior, a vertebra with paraspinal
muscles) in air, holding up to eight organ-like structures with plausible CT intensities, positions and
sizes:

=============  ==========  ==========================================================
label          HU          shape and place (portal-venous phase contrast)
=============  ==========  ==========================================================
liver          100 / 180   two deformed ellipsoids (right lobe, left lobe), right, upper; contrast-filled
                           vessel branches (180) inside, part of the label as in real data
stomach        10 / -800   fluid-filled deformed ellipsoid with an anterior air cap, left, anterior
spleen         125         rotated deformed ellipsoid, left, posterior, upper
aorta          200         contrast-filled tube along the cranio-caudal axis, left of the spine
kidney_right   150         ellipsoid (enhancing cortex), right paravertebral, lower than the left
kidney_left    150         ellipsoid, left paravertebral
pancreas       80          thin rotated ellipsoid across the midline
gallbladder    5           small ellipsoid under the liver, right, anterior
=============  ==========  ==========================================================

Around them: air (-1000), subcutaneous fat (-100), a fat/bowel interior (-60 with a smooth texture),
paraspinal muscle (55) and a vertebral body (400).

Every case varies: a global scale, rotation about the cranio-caudal axis and translation, and per organ a
centre jitter, radius scale, orientation jitter and a low-frequency boundary deformation. Gaussian noise is
added. Everything is deterministic given ``seed`` (case ``i`` uses ``seed`` and ``i``, so the first cases do
not change when ``num_cases`` grows).

Overlaps are resolved by a fixed priority (:data:`LABEL_PRIORITY`, highest first): a voxel claimed by
several organs gets the one listed first, so labels are disjoint. Organs are clipped to the body interior.

Array layout: images are generated as numpy arrays of shape ``shape`` = (axis 0, axis 1, axis 2) =
(z: inferior -> superior, y: anterior -> posterior, x: patient right -> patient left), i.e. the order of
``SimpleITK.GetArrayFromImage`` for an LPS image with identity direction; ``spacing`` is given in the
same array order (as nnU-Net's plans do) and written reversed into the NIfTI header.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_cimis.errors import CIMISError

#: Label names in label-value order (value = position + 1 when all organs are used).
#: The stomach comes second on purpose: nnU-Net's CT normalisation clips intensities to the 0.5-99.5
#: percentiles of the labelled voxels of the dataset it plans on, and a scenario plans once on step 0. With
#: the stomach's air cap among the first classes, that window spans air to soft tissue, so classes added
#: later (kidneys at 30 HU, gallbladder at 10 HU) stay distinct from fat; with liver and spleen alone it
#: would be about [25, 85] HU and fat, gallbladder and kidneys would be clipped alike.
ORGANS: Tuple[str, ...] = ("liver", "stomach", "spleen", "aorta", "kidney_right", "kidney_left",
                           "pancreas", "gallbladder")

#: Priority used to resolve overlaps, highest first.
LABEL_PRIORITY: Tuple[str, ...] = ("aorta", "gallbladder", "kidney_right", "kidney_left", "pancreas",
                                   "spleen", "stomach", "liver")

#: Mean CT intensity (HU) of each organ (stomach: its fluid content; the air cap is AIR_HU_STOMACH).
ORGAN_HU: Dict[str, float] = {"liver": 100.0, "spleen": 125.0, "kidney_right": 150.0, "kidney_left": 150.0,
                              "aorta": 200.0, "stomach": 10.0, "pancreas": 80.0, "gallbladder": 5.0}
#: Contrast-filled intrahepatic vessels (portal / hepatic veins), part of the liver label as in real data.
LIVER_VESSEL_HU = 180.0
AIR_HU = -1000.0
AIR_HU_STOMACH = -800.0
SUBCUTANEOUS_FAT_HU = -100.0
INTERIOR_HU = -60.0  # mixed mesenteric fat and bowel
MUSCLE_HU = 55.0
BONE_HU = 400.0

# Nominal geometry in normalised coordinates (each axis spans [-1, 1] over the field of view), order
# (x, y, z): centre, radii, rotation about z in degrees.
_ELLIPSOIDS = {
    "liver_right_lobe": ((-0.40, -0.05, 0.35), (0.38, 0.42, 0.45), 0.0),
    "liver_left_lobe": ((0.05, -0.35, 0.45), (0.35, 0.20, 0.30), 10.0),
    "spleen": ((0.56, 0.25, 0.40), (0.19, 0.30, 0.30), 30.0),
    "kidney_right": ((-0.38, 0.40, -0.12), (0.20, 0.24, 0.36), -15.0),
    "kidney_left": ((0.38, 0.40, 0.0), (0.20, 0.24, 0.36), 15.0),
    "stomach": ((0.35, -0.25, 0.35), (0.28, 0.23, 0.32), -20.0),
    "pancreas": ((0.10, 0.04, 0.05), (0.40, 0.13, 0.16), 15.0),
    "gallbladder": ((-0.25, -0.38, 0.0), (0.14, 0.16, 0.22), 0.0),
}
_AORTA = ((0.08, 0.20), 0.11)  # centre (x, y), radius
_SPINE = ((0.0, 0.52), 0.15)
_BODY = ((0.0, 0.05), (0.92, 0.72))  # centre (x, y), radii (x, y)
_FAT_LAYER = 0.13  # fraction of the body radius taken by subcutaneous fat


def _rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _deformed_ellipsoid(p: np.ndarray, centre, radii, angle_deg: float, rng: np.random.Generator,
                        deformation: float) -> np.ndarray:
    """Boolean mask of a randomly deformed, rotated ellipsoid; ``p`` has shape (3, *spatial) in (x, y, z)."""
    centre = np.asarray(centre, dtype=np.float64) + rng.uniform(-0.04, 0.04, 3)
    radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.85, 1.15, 3)
    rot = _rot_z(angle_deg + rng.uniform(-10.0, 10.0))
    q = np.tensordot(rot.T, p - centre[:, None, None, None], axes=1) / radii[:, None, None, None]
    r2 = (q ** 2).sum(0)
    # low-frequency boundary deformation: two random plane waves in the unit-sphere frame
    bump = np.zeros_like(r2)
    for _ in range(2):
        w = rng.normal(0.0, 1.0, 3)
        w *= rng.uniform(1.5, 3.0) / (np.linalg.norm(w) + 1e-8)
        bump += np.sin(np.tensordot(w, q, axes=1) + rng.uniform(0, 2 * np.pi))
    return r2 <= 1.0 + deformation * bump / 2.0


def _vessel_tree(p: np.ndarray, rng: np.random.Generator, branches: int = 4, radius: float = 0.06) -> np.ndarray:
    """Rays of radius ``radius`` from a jittered liver hilum in random, mostly axial directions."""
    hilum = np.array([-0.30, 0.05, 0.25]) + rng.uniform(-0.05, 0.05, 3)
    v = p - hilum[:, None, None, None]
    out = np.zeros(p.shape[1:], dtype=bool)
    for _ in range(branches):
        d = rng.normal(0.0, 1.0, 3)
        d[2] *= 0.5
        d /= np.linalg.norm(d) + 1e-8
        along = np.tensordot(d, v, axes=1)
        out |= (along >= 0) & ((v ** 2).sum(0) - along ** 2 <= radius ** 2)
    return out


def _grid(shape: Sequence[int]) -> np.ndarray:
    """Normalised coordinates, shape (3, *shape), channel order (x, y, z) for array axes (z, y, x)."""
    axes = [(np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0 for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([xx, yy, zz])


def make_abdominal_case(shape: Sequence[int] = (32, 32, 32), seed: int = 0, case_index: int = 0,
                        organs: Optional[Sequence[str]] = None, noise_std: float = 8.0,
                        deformation: float = 0.15) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Generate one phantom case in memory.

    Args:
        shape: array shape (z, y, x); each at least 8.
        seed, case_index: the case's random stream is ``np.random.default_rng([seed, case_index])``.
        organs: subset of :data:`ORGANS` to label (in that order, values 1..n); default all. Unlabelled
            organs are not drawn (their place holds the interior tissue).
        noise_std: standard deviation (HU) of the additive Gaussian noise.
        deformation: amplitude of the boundary deformation (0 = plain ellipsoids).

    Returns:
        ``(image, label, labels)``: image float32 HU of ``shape``, label uint8 of ``shape``, and the
        label dict ``{"background": 0, name: value, ...}``.

    Raises:
        CIMISError: unknown organ names, a shape that is not three integers >= 8, negative noise.
    """
    organs = _check_organs(organs)
    shape = _check_shape(shape)
    if noise_std < 0:
        raise CIMISError(f"noise_std must be >= 0, got {noise_std}")
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(organs)}}
    rng = np.random.default_rng([int(seed), int(case_index)])

    # global pose: p = R^-1 (u - t) / s, so the body is scaled by s, rotated by R and moved by t
    u = _grid(shape)
    scale = rng.uniform(0.9, 1.05, 3)
    shift = np.append(rng.uniform(-0.05, 0.05, 2), rng.uniform(-0.08, 0.08))
    rot = _rot_z(rng.uniform(-10.0, 10.0))
    p = np.tensordot(rot.T, u - shift[:, None, None, None], axes=1) / scale[:, None, None, None]
    x, y, z = p

    (bx, by), (brx, bry) = _BODY
    body_r = np.sqrt(((x - bx) / brx) ** 2 + ((y - by) / bry) ** 2)
    body = body_r <= 1.0
    interior = body_r <= 1.0 - _FAT_LAYER

    image = np.full(shape, AIR_HU, dtype=np.float64)
    image[body] = SUBCUTANEOUS_FAT_HU
    # interior: fat/bowel mixture with a smooth texture
    texture = np.sin(6.0 * x + rng.uniform(0, 6.3)) * np.sin(5.0 * y + rng.uniform(0, 6.3)) * \
        np.sin(4.0 * z + rng.uniform(0, 6.3))
    image[interior] = INTERIOR_HU + 10.0 * texture[interior]
    (sx, sy), sr = _SPINE
    spine_d = np.sqrt((x - sx) ** 2 + (y - sy) ** 2)
    muscle = interior & (np.sqrt((np.abs(x - sx) - 0.2) ** 2 / 0.9 + (y - sy - 0.05) ** 2) <= 0.13)
    image[muscle] = MUSCLE_HU
    image[interior & (spine_d <= sr)] = BONE_HU

    masks: Dict[str, np.ndarray] = {}
    for name in organs:
        if name == "aorta":
            (ax_, ay_), ar = _AORTA
            cx = ax_ + rng.uniform(-0.03, 0.03) + 0.03 * np.sin(2.0 * z + rng.uniform(0, 6.3))
            cy = ay_ + rng.uniform(-0.03, 0.03)
            r = ar * rng.uniform(0.9, 1.15)
            m = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
        elif name == "liver":
            m = _deformed_ellipsoid(p, *_ELLIPSOIDS["liver_right_lobe"], rng, deformation) | \
                _deformed_ellipsoid(p, *_ELLIPSOIDS["liver_left_lobe"], rng, deformation)
        else:
            m = _deformed_ellipsoid(p, *_ELLIPSOIDS[name], rng, deformation)
        masks[name] = m & interior & (spine_d > sr)

    label = np.zeros(shape, dtype=np.uint8)
    for name in reversed(LABEL_PRIORITY):  # lowest priority first, higher ones overwrite
        if name in masks:
            label[masks[name]] = labels[name]
    for name in organs:
        sel = label == labels[name]
        image[sel] = ORGAN_HU[name]
        if name == "stomach" and sel.any():
            # air cap: the most anterior part of the stomach (low y)
            ys = y[sel]
            cut = ys.min() + 0.3 * (ys.max() - ys.min())
            image[sel & (y <= cut)] = AIR_HU_STOMACH
        if name == "liver" and sel.any():
            image[sel & _vessel_tree(p, rng)] = LIVER_VESSEL_HU

    image += rng.normal(0.0, noise_std, shape) if noise_std > 0 else 0.0
    return image.astype(np.float32), label, labels


def _check_organs(organs: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if organs is None:
        return ORGANS
    organs = tuple(organs)
    unknown = [o for o in organs if o not in ORGANS]
    if unknown or not organs or len(set(organs)) != len(organs):
        raise CIMISError(f"organs must be a non-empty subset of {list(ORGANS)} without repeats, got "
                         f"{list(organs)}")
    return tuple(o for o in ORGANS if o in organs)


def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise CIMISError(f"shape must be three integers, got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise CIMISError(f"shape must be three integers >= 8 (z, y, x), got {shape}")
    return shape


def write_abdominal_phantom(raw_folder: str, dataset_id: int, num_cases: int,
                            shape: Sequence[int] = (32, 32, 32),
                            spacing: Sequence[float] = (1.5, 1.5, 1.5), seed: int = 0,
                            dataset_name: str = "AbdominalPhantom",
                            organs: Optional[Sequence[str]] = None, noise_std: float = 8.0,
                            deformation: float = 0.15, overwrite: bool = False) -> str:
    """Write ``num_cases`` phantom cases as the nnU-Net raw dataset ``Dataset<ID>_<dataset_name>``.

    Files: ``imagesTr/<case>_0000.nii.gz`` (int16 HU), ``labelsTr/<case>.nii.gz`` (uint8), ``dataset.json``
    (channel ``CT``, named labels, file ending ``.nii.gz``). Case ids are ``phantom_000``, ``phantom_001``, ...

    Args:
        raw_folder: nnU-Net raw folder (``$nnUNet_raw``); created if missing.
        dataset_id: 1..999.
        num_cases: >= 1.
        shape: array shape (z, y, x), e.g. (32, 32, 32) or (64, 64, 64).
        spacing: voxel spacing in mm in the same axis order, e.g. (3, 1.5, 1.5) for thick slices.
        seed: random seed; same seed, same files.
        dataset_name: the part after ``Dataset<ID>_``.
        organs, noise_std, deformation: see :func:`make_abdominal_case`.
        overwrite: replace an existing folder of the same name; otherwise it is an error.

    Returns:
        The dataset folder.

    Raises:
        CIMISError: bad arguments, or the dataset id already used by a folder in ``raw_folder`` (another
        name, or the same name without ``overwrite``).
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise CIMISError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if int(num_cases) < 1:
        raise CIMISError(f"num_cases must be >= 1, got {num_cases}")
    shape = _check_shape(shape)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise CIMISError(f"spacing must be three positive numbers (z, y, x), got {spacing}")
    organs = _check_organs(organs)
    from nnunetv2_cimis.nnunet_folders import claim_raw_dataset_folder
    out = claim_raw_dataset_folder(raw_folder, int(dataset_id), dataset_name, overwrite)
    os.makedirs(os.path.join(out, "imagesTr"))
    os.makedirs(os.path.join(out, "labelsTr"))

    labels = None
    for i in range(int(num_cases)):
        image, label, labels = make_abdominal_case(shape, seed, i, organs, noise_std, deformation)
        case = f"phantom_{i:03d}"
        for arr, path in ((np.round(image).astype(np.int16), os.path.join(out, "imagesTr", f"{case}_0000.nii.gz")),
                          (label, os.path.join(out, "labelsTr", f"{case}.nii.gz"))):
            itk = sitk.GetImageFromArray(arr)
            itk.SetSpacing(tuple(reversed(spacing)))
            sitk.WriteImage(itk, path, useCompression=True)
    generate_dataset_json(out, {0: "CT"}, labels, int(num_cases), ".nii.gz", dataset_name=dataset_name,
                          description="Synthetic abdominal CT phantom (nnunetv2_cimis.phantom.abdominal3d), "
                                      f"seed {seed}, shape {list(shape)}, spacing {list(spacing)}",
                          license="CC0", converted_by="nnunetv2_cimis.phantom.abdominal3d",
                          reference="synthetic", release="1.0")
    return out

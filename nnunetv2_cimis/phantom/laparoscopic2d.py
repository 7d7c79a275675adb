"""Synthetic 2D laparoscopic phantom (RGB frames), written as an nnU-Net raw 2D dataset.

A frame is a textured reddish tissue background seen through a laparoscope (dark circular border, radial
fall-off of the light, a few specular highlights), holding some of six structures whose names follow the
Dresden Surgical Anatomy Dataset (DSAD):

==================  =====================  ===============================================
label               colour (RGB, mean)     shape
==================  =====================  ===============================================
liver               (110, 30, 28)          large deformed ellipse with a smooth surface
stomach             (215, 130, 150)        medium deformed ellipse, fine folds texture
colon               (175, 155, 95)         wide curved band (a Bezier curve with thickness)
fat                 (240, 205, 70)         lobulated patches, coarse texture
ureter              (240, 240, 235)        curved tube, 6-9 % of the frame wide
vesicular_glands    (185, 125, 190)        two lobulated blobs side by side
==================  =====================  ===============================================

Each structure differs from the background and from every other structure in colour (mean colours at least
50 grey levels apart in RGB), in texture or in shape, so that each one can be learned from a few dozen
frames. An earlier version drew close colours on purpose (colon / vesicular glands / stomach, ureter /
fat), a thinner ureter, smaller glands and a stronger light fall-off; with it, the 2D demo's joint
model reached a validation Dice of 0.28 on the glands and 0.55 on the ureter after 600 iterations
(docs/benchmarks.md, "2D laparoscopic demo"). Each frame jitters every colour, the illumination and the
layout; each structure appears with probability ``presence`` (liver and fat more often). Overlaps:
later in :data:`PAINT_ORDER` wins (thin structures on top).

Annotation. By default every structure present is labelled. With ``structures_per_frame=k`` only ``k``
of the structures present in a frame are labelled, the others are left as background, as in DSAD whose
frames are annotated for a few structures each (test frames, ``imagesTs``/``labelsTs``, are always fully
labelled).

File format (a documented choice): one RGB PNG per frame, ``imagesTr/<case>_0000.png`` (read by nnU-Net's
``NaturalImage2DIO`` as three channels), masks ``labelsTr/<case>.png`` (uint8); ``dataset.json`` names the
three channels ``rgb_to_0_1`` (nnU-Net's RGB normalisation: values / 255, colours kept) and sets
``overwrite_image_reader_writer`` to ``NaturalImage2DIO``. Use nnU-Net's ``2d`` configuration.

Everything is deterministic given ``seed`` (frame ``i`` uses ``numpy.random.default_rng([seed, i])``).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_cimis.errors import CIMISError

#: Label names in label-value order (value = position + 1 when all structures are used).
STRUCTURES: Tuple[str, ...] = ("liver", "stomach", "colon", "fat", "ureter", "vesicular_glands")

#: Drawing order; a later structure covers an earlier one.
PAINT_ORDER: Tuple[str, ...] = ("fat", "liver", "stomach", "colon", "vesicular_glands", "ureter")

COLOURS: Dict[str, Tuple[float, float, float]] = {
    "background": (165, 70, 60), "liver": (110, 30, 28), "stomach": (215, 130, 150), "colon": (175, 155, 95),
    "fat": (240, 205, 70), "ureter": (240, 240, 235), "vesicular_glands": (185, 125, 190)}

#: Relative probability multipliers of presence (times ``presence``, clipped to 1).
_PRESENCE_BOOST = {"liver": 1.2, "fat": 1.2}
#: Texture: (number of plane waves, frequency range in cycles per frame, amplitude in grey levels).
_TEXTURE = {"background": (6, (3, 10), 12), "liver": (3, (1, 3), 6), "stomach": (6, (8, 16), 10),
            "colon": (5, (4, 9), 10), "fat": (6, (6, 14), 18), "ureter": (2, (1, 2), 4),
            "vesicular_glands": (5, (10, 18), 12)}


def _check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise CIMISError(f"shape must be two integers (height, width), got {shape!r}") from None
    if len(shape) != 2 or min(shape) < 16:
        raise CIMISError(f"shape must be two integers >= 16 (height, width), got {list(shape)}")
    return shape


def _grid(shape):
    ys = (np.arange(shape[0]) + 0.5) / shape[0] * 2 - 1
    xs = (np.arange(shape[1]) + 0.5) / shape[1] * 2 - 1
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return yy, xx


def _texture(rng, yy, xx, spec) -> np.ndarray:
    n, (f0, f1), amp = spec
    t = np.zeros_like(yy)
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(f0, f1) * np.pi / 2
        t += np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
    return amp * t / np.sqrt(n)


def _blob(rng, yy, xx, centre, radii, deformation=0.25) -> np.ndarray:
    cy, cx = np.asarray(centre) + rng.uniform(-0.1, 0.1, 2)
    ry, rx = np.asarray(radii) * rng.uniform(0.8, 1.2, 2)
    a = rng.uniform(0, np.pi)
    qy = (np.cos(a) * (yy - cy) - np.sin(a) * (xx - cx)) / ry
    qx = (np.sin(a) * (yy - cy) + np.cos(a) * (xx - cx)) / rx
    bump = sum(np.sin(rng.uniform(2, 4) * (np.cos(b) * qx + np.sin(b) * qy) + rng.uniform(0, 2 * np.pi))
               for b in rng.uniform(0, 2 * np.pi, 2))
    return qy ** 2 + qx ** 2 <= 1 + deformation * bump / 2


def _tube(rng, yy, xx, radius) -> np.ndarray:
    """A thick quadratic Bezier curve crossing the frame."""
    p0 = rng.uniform(-1.1, 1.1, 2) * np.array([1, 0]) + np.array([0, -1.1])
    p2 = rng.uniform(-1.1, 1.1, 2) * np.array([1, 0]) + np.array([0, 1.1])
    if rng.random() < 0.5:  # vertical or horizontal crossing
        p0, p2 = p0[::-1], p2[::-1]
    p1 = rng.uniform(-0.6, 0.6, 2)
    s = np.linspace(0, 1, 64)[:, None]
    pts = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2  # (64, 2) as (y, x)
    d2 = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    return d2.min(0) <= radius ** 2


def _structure_mask(name, rng, yy, xx) -> np.ndarray:
    if name == "liver":
        corner = rng.choice([-1, 1], 2) * 0.5
        return _blob(rng, yy, xx, corner, (0.6, 0.7), 0.2)
    if name == "stomach":
        return _blob(rng, yy, xx, rng.uniform(-0.5, 0.5, 2), (0.35, 0.45), 0.3)
    if name == "colon":
        return _tube(rng, yy, xx, rng.uniform(0.14, 0.22))
    if name == "fat":
        m = np.zeros(yy.shape, dtype=bool)
        for _ in range(rng.integers(2, 5)):
            m |= _blob(rng, yy, xx, rng.uniform(-0.8, 0.8, 2), (0.2, 0.25), 0.5)
        return m
    if name == "ureter":
        return _tube(rng, yy, xx, rng.uniform(0.06, 0.09))
    if name == "vesicular_glands":
        c = rng.uniform(-0.5, 0.5, 2)
        off = np.array([0.0, rng.uniform(0.25, 0.35)])
        return _blob(rng, yy, xx, c - off, (0.2, 0.16), 0.4) | _blob(rng, yy, xx, c + off, (0.2, 0.16), 0.4)
    raise ValueError(name)


def make_laparoscopic_frame(shape: Sequence[int] = (64, 64), seed: int = 0, frame_index: int = 0,
                            structures: Optional[Sequence[str]] = None, presence: float = 0.7,
                            noise_std: float = 4.0) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Generate one frame in memory.

    Args:
        shape: (height, width), each >= 16.
        seed, frame_index: the frame's random stream is ``np.random.default_rng([seed, frame_index])``.
        structures: subset of :data:`STRUCTURES` to draw and label (values 1..n in that order); default all.
        presence: probability that a structure appears in a frame (liver and fat: 1.2 times that).
        noise_std: standard deviation of the additive Gaussian noise (grey levels).

    Returns:
        ``(image, label, labels)``: ``image`` uint8 ``(H, W, 3)``, ``label`` uint8 ``(H, W)``, ``labels``
        the ``dataset.json`` label dict (``{"background": 0, name: value, ...}``).
    """
    shape = _check_shape(shape)
    structures = _check_structures(structures)
    if not 0.0 <= presence <= 1.0:
        raise CIMISError(f"presence must be in [0, 1], got {presence}")
    rng = np.random.default_rng([int(seed), int(frame_index)])
    yy, xx = _grid(shape)
    values = {name: i + 1 for i, name in enumerate(structures)}

    def colour(name):
        base = np.asarray(COLOURS[name], dtype=np.float64) * rng.uniform(0.9, 1.1) + rng.normal(0, 6, 3)
        return base[:, None, None] + _texture(rng, yy, xx, _TEXTURE[name])[None]

    image = colour("background")
    label = np.zeros(shape, dtype=np.uint8)
    for name in PAINT_ORDER:
        if name not in values:
            continue
        if rng.random() >= min(1.0, presence * _PRESENCE_BOOST.get(name, 1.0)):
            continue
        mask = _structure_mask(name, rng, yy, xx)
        image = np.where(mask[None], colour(name), image)
        label[mask] = values[name]
    # laparoscope optics: radial light fall-off, dark circular border, specular highlights, noise
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    light = np.clip(1.1 - 0.3 * r ** 2, 0.5, 1.2) * rng.uniform(0.9, 1.1)
    image = image * light[None]
    image[:, r > rng.uniform(1.15, 1.35)] *= 0.1
    for _ in range(rng.integers(1, 4)):
        hy, hx = rng.uniform(-0.8, 0.8, 2)
        spot = np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * rng.uniform(0.01, 0.03) ** 2))
        image = image + 255 * spot[None]
    image = image + rng.normal(0, noise_std, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return image, label, {"background": 0, **values}


def _check_structures(structures):
    if structures is None:
        return list(STRUCTURES)
    structures = list(structures)
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown or not structures or len(set(structures)) != len(structures):
        raise CIMISError(f"structures must be distinct names from {list(STRUCTURES)}, got {structures}")
    return [s for s in STRUCTURES if s in structures]


def sparsify_annotation(label: np.ndarray, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Keep the labels of at most ``keep`` of the structures present in ``label``; set the others to 0."""
    present = [int(v) for v in np.unique(label) if v != 0]
    if len(present) <= keep:
        return label
    kept = rng.choice(present, size=keep, replace=False)
    return np.where(np.isin(label, kept), label, 0).astype(label.dtype)


def write_laparoscopic_phantom(raw_folder: str, dataset_id: int, num_cases: int, seed: int = 0,
                               shape: Sequence[int] = (64, 64), dataset_name: str = "LaparoscopicPhantom",
                               structures: Optional[Sequence[str]] = None, presence: float = 0.7,
                               structures_per_frame: Optional[int] = None, num_test_cases: int = 0,
                               noise_std: float = 4.0, overwrite: bool = False) -> str:
    """Write ``num_cases`` frames as the nnU-Net raw 2D dataset ``Dataset<ID>_<dataset_name>``.

    Files: ``imagesTr/<case>_0000.png`` (RGB), ``labelsTr/<case>.png`` (uint8), optionally
    ``imagesTs``/``labelsTs`` (``num_test_cases`` fully labelled frames, drawn after the training ones),
    ``dataset.json`` (three ``rgb_to_0_1`` channels, named labels, ``.png``, ``NaturalImage2DIO``).
    Case ids are ``lap_000``, ``lap_001``, ...

    Args:
        raw_folder: nnU-Net raw folder (``$nnUNet_raw``); created if missing.
        dataset_id: 1..999.
        num_cases: training frames, >= 1.
        seed: random seed; same seed, same files.
        shape: (height, width) of the frames, each >= 16 (default 64 x 64).
        dataset_name: the part after ``Dataset<ID>_``.
        structures, presence, noise_std: see :func:`make_laparoscopic_frame`.
        structures_per_frame: label only this many of the structures present in each training frame
            (DSAD-like sparse annotation); None (default) labels all.
        num_test_cases: fully labelled test frames written to ``imagesTs``/``labelsTs`` (default 0).
        overwrite: replace an existing folder of the same name; otherwise it is an error.

    Returns:
        The dataset folder.

    Raises:
        CIMISError: bad arguments, or the dataset id already used in ``raw_folder``.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from PIL import Image

    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise CIMISError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if int(num_cases) < 1:
        raise CIMISError(f"num_cases must be >= 1, got {num_cases}")
    if int(num_test_cases) < 0:
        raise CIMISError(f"num_test_cases must be >= 0, got {num_test_cases}")
    if structures_per_frame is not None and int(structures_per_frame) < 1:
        raise CIMISError(f"structures_per_frame must be >= 1 or None, got {structures_per_frame}")
    shape = _check_shape(shape)
    structures = _check_structures(structures)
    from nnunetv2_cimis.nnunet_folders import claim_raw_dataset_folder
    out = claim_raw_dataset_folder(raw_folder, int(dataset_id), dataset_name, overwrite)
    sub = ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if num_test_cases else [])
    for s in sub:
        os.makedirs(os.path.join(out, s))

    labels = None
    total = int(num_cases) + int(num_test_cases)
    for i in range(total):
        image, label, labels = make_laparoscopic_frame(shape, seed, i, structures, presence, noise_std)
        is_test = i >= int(num_cases)
        if structures_per_frame is not None and not is_test:
            label = sparsify_annotation(label, int(structures_per_frame),
                                        np.random.default_rng([int(seed), i, 1]))
        case = f"lap_{i:03d}"
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        Image.fromarray(image, mode="RGB").save(os.path.join(out, img_dir, f"{case}_0000.png"))
        Image.fromarray(label, mode="L").save(os.path.join(out, lab_dir, f"{case}.png"))
    generate_dataset_json(out, {0: "rgb_to_0_1", 1: "rgb_to_0_1", 2: "rgb_to_0_1"}, labels, int(num_cases), ".png",
                          dataset_name=dataset_name,
                          description="Synthetic 2D laparoscopic phantom (nnunetv2_cimis.phantom.laparoscopic2d), "
                                      f"seed {seed}, shape {list(shape)}, structures_per_frame "
                                      f"{structures_per_frame}",
                          license="CC0", converted_by="nnunetv2_cimis.phantom.laparoscopic2d",
                          reference="synthetic", release="1.0",
                          overwrite_image_reader_writer="NaturalImage2DIO")
    return out

"""Conditioning masks of MOSInversion: where they come from, how they are varied, how they are cleaned.

* :func:`conditioning_masks`: the label patches a step memory offers (its label bank plus the masks carried
  from earlier steps by ``nnUNetTrainerMOSInv``);
* :class:`MaskAugmentation`: random variation of a mask before it conditions an inversion. The first author's
  mask-conditioned generator only flips its masks; the paper's text mentions manipulating the organs' shape,
  location and size through the masks. The elastic deformation, rotation and scaling here are this package's
  choice in that direction (``p_elastic = p_rotation = p_scale = 0`` leaves flips only, as in the author's code);
* :func:`sanitize_mask`: labels the network cannot produce become background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

__all__ = ["MaskAugmentation", "sanitize_mask", "conditioning_masks"]


@dataclass
class MaskAugmentation:
    """Random variation of a conditioning mask: flips, then elastic deformation, rotation and scaling.

    Uses ``batchgenerators.augmentations.spatial_transformations.augment_spatial`` (nearest neighbour on the
    labels, constant 0 outside). Probabilities are per mask; angles in radians, about every axis in 3D.
    Every value is a choice of this package: the first author's mask-conditioned generator only flips its masks;
    elastic deformation, rotation and scaling are added here (set their probabilities to 0 for flips only).
    """

    p_flip: float = 0.5  # per axis
    p_elastic: float = 0.3
    elastic_alpha: Tuple[float, float] = (0.0, 200.0)
    elastic_sigma: Tuple[float, float] = (9.0, 13.0)
    p_rotation: float = 0.5
    max_angle: float = math.pi / 12  # 15 degrees
    p_scale: float = 0.5
    scale: Tuple[float, float] = (0.85, 1.15)

    def __post_init__(self):
        for n in ("p_flip", "p_elastic", "p_rotation", "p_scale"):
            v = getattr(self, n)
            if not 0 <= v <= 1:
                raise ValueError(f"{n} must be in [0, 1], got {v}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")

    def __call__(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of the integer ``mask`` (spatial shape unchanged, dtype uint8)."""
        from batchgenerators.augmentations.spatial_transformations import augment_spatial

        m = np.asarray(mask)
        if m.ndim == 4 and m.shape[0] == 1:  # (1, X, Y, Z): a channel axis
            m = m[0]
        if m.ndim not in (2, 3):
            raise ValueError(f"a conditioning mask must be 2D or 3D, got shape {m.shape}")
        for axis in range(m.ndim):
            if rng.uniform() < self.p_flip:
                m = np.flip(m, axis)
        m = np.ascontiguousarray(m)
        do_el, do_rot, do_sc = (rng.uniform() < p for p in (self.p_elastic, self.p_rotation, self.p_scale))
        if not (do_el or do_rot or do_sc):
            return m.astype(np.uint8)
        # augment_spatial draws from numpy's global generator: seed it from rng, restore it afterwards
        state = np.random.get_state()
        np.random.seed(int(rng.integers(0, 2 ** 31 - 1)))
        try:
            a = self.max_angle
            seg = m[None, None].astype(np.float32)
            _, out = augment_spatial(
                np.zeros_like(seg), seg,
                patch_size=m.shape, random_crop=False,
                do_elastic_deform=do_el, alpha=self.elastic_alpha, sigma=self.elastic_sigma,
                do_rotation=do_rot, angle_x=(-a, a), angle_y=(-a, a), angle_z=(-a, a),
                do_scale=do_sc, scale=self.scale, order_data=0, order_seg=0,
                border_mode_seg="constant", border_cval_seg=0)
        finally:
            np.random.set_state(state)
        return np.rint(out[0, 0]).astype(np.uint8)


def sanitize_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels a network with ``num_classes`` outputs cannot produce (>= num_classes, e.g. 255 for 'outside')
    become background."""
    m = np.asarray(mask).astype(np.int64)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    m[(m < 0) | (m >= num_classes)] = 0
    return m


def conditioning_masks(memory) -> List[np.ndarray]:
    """The masks a step memory offers for conditioning: its ``label_bank`` plus the masks carried from earlier
    steps under ``extra["inversion_label_bank"]`` (written by ``nnUNetTrainerMOSInv.extend_step_memory``)."""
    masks = list(memory.label_bank or [])
    masks += list((memory.extra or {}).get("inversion_label_bank", []) or [])
    return masks

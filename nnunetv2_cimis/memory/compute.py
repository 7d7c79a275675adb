"""Computing a step's memory in one pass over its training cases.

For each preprocessed training case we take patch-sized crops (one centred on each labelled class and, for
background statistics, one at the image centre), run the trained network in eval mode, and accumulate:

* per label, the sum of the tap's features over the voxels of that label (labels resized to the tap's
  resolution by nearest neighbour) and the voxel count -> prototypes;
* per normalisation layer, per channel, the sum and sum of squares of its input -> mean and variance;
* one label crop per case (up to ``bank_size``) -> the label bank.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunetv2_cimis.networks.taps import FeatureTaps
from nnunetv2_cimis.losses.common import resize_labels_nearest
from nnunetv2_cimis.memory.step_memory import StepMemory
from nnunetv2_cimis.networks.norm_statistics import NormInputRecorder
from nnunetv2_cimis.networks.unwrap import unwrap_network

DEFAULT_PROTOTYPE_TAP = "decoder.stages.-2"


def crop_around(array: np.ndarray, center: Sequence[int], size: Sequence[int], pad_value=0) -> np.ndarray:
    """Crop ``array`` (C, *spatial) to ``size`` centred at ``center``, padding with ``pad_value`` outside."""
    spatial = array.shape[1:]
    out = np.full((array.shape[0],) + tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for c, s, n in zip(center, size, spatial):
        lo = int(c) - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(slice(None),) + tuple(dst)] = array[(slice(None),) + tuple(src)]
    return out


def patch_centres(seg: np.ndarray, labels: Iterable[int], rng: np.random.RandomState) -> List[List[int]]:
    """One centre per label present (a random voxel of it) plus the image centre. ``seg`` is (X, Y, Z)."""
    centres = [[s // 2 for s in seg.shape]]
    for v in labels:
        idx = np.argwhere(seg == v)
        if len(idx):
            centres.append(list(idx[rng.randint(len(idx))]))
    return centres


@torch.no_grad()
def compute_step_memory(network: nn.Module, dataset, identifiers: Sequence[str], patch_size: Sequence[int],
                        labels: Dict[int, str], device: torch.device,
                        prototype_tap: str = DEFAULT_PROTOTYPE_TAP, bank_size: int = 32,
                        max_cases: Optional[int] = None, seed: int = 0, progress: bool = False) -> StepMemory:
    """One pass over ``identifiers`` of an nnU-Net preprocessed ``dataset`` (an ``nnUNetDataset*`` instance).

    Args:
        network: the trained network (deep supervision may be on; only the tap and norm layers are read).
        dataset: object with ``load_case(identifier) -> (data, seg, seg_prev, properties)``.
        identifiers: training cases of the step.
        patch_size: spatial patch size of the plans (2 or 3 entries; 2D plans take one slice per crop).
        labels: label value -> name of every class the model knows, background included.
        prototype_tap: module path of the prototype features.
        bank_size: maximum number of label crops kept for mask-conditioned synthesis.
        max_cases: use at most this many cases (None: all).
        progress: show a progress bar (tqdm, on stderr) over the cases.
    """
    was_training = unwrap_network(network).training
    network.eval()
    rng = np.random.RandomState(seed)
    n_rows = max(labels) + 1
    taps = FeatureTaps(network, {"proto": prototype_tap}, detach=True)
    norm_stats = NormInputRecorder(network, batch_stats=False, accumulate=True)
    sums = None
    counts = torch.zeros(n_rows, dtype=torch.float64)
    bank: List[np.ndarray] = []
    two_d = len(patch_size) == 2
    try:
        todo = list(identifiers) if max_cases is None else list(identifiers)[:max_cases]
        for identifier in tqdm(todo, desc="step memory", unit="case", disable=not progress, file=sys.stderr):
            data, seg, _, _ = dataset.load_case(identifier)
            data = np.asarray(data)
            seg = np.asarray(seg)
            seg3 = seg[0]
            for j, centre in enumerate(patch_centres(seg3, [v for v in labels if v > 0], rng)):
                if two_d:
                    z = int(centre[0])
                    d = crop_around(data[:, z], centre[1:], patch_size, 0)
                    s = crop_around(seg[:, z], centre[1:], patch_size, 0)
                else:
                    d = crop_around(data, centre, patch_size, 0)
                    s = crop_around(seg, centre, patch_size, 0)
                s = np.where(s < 0, 0, s)  # nnU-Net marks outside-of-mask voxels with -1
                if j == 1 and len(bank) < bank_size:  # first class-centred crop of the case
                    bank.append(s[0].astype(np.uint8))
                x = torch.from_numpy(np.ascontiguousarray(d[None])).float().to(device)
                network(x)
                feat = taps.features["proto"].double()
                lab = resize_labels_nearest(torch.from_numpy(s).long().to(device), feat.shape[2:])
                lab = lab.clamp(0, n_rows - 1)
                onehot = torch.nn.functional.one_hot(lab, n_rows).movedim(-1, 1).double()
                part = torch.einsum("bkn,bcn->kc", onehot.flatten(2), feat.flatten(2)).cpu()
                sums = part if sums is None else sums + part
                counts += onehot.sum(dim=[0] + list(range(2, onehot.ndim))).cpu()
    finally:
        taps.remove()
        norm_stats.remove()
        if was_training:
            network.train()
    if sums is None:
        raise ValueError("compute_step_memory received no training case")
    prototypes = (sums / counts.clamp_min(1)[:, None]).float()
    return StepMemory(labels=dict(labels), prototype_tap=prototype_tap, prototypes=prototypes,
                      prototype_counts=counts, norm_stats=norm_stats.result(), label_bank=bank,
                      patch_size=[int(p) for p in patch_size])

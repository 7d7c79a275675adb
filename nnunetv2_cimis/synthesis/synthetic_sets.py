"""Synthetic sets on disk: MOSInversion's replay data, made once per teacher and reused.

A set is a folder of ``volume_XXXX.npz`` (``image`` float32 ``(C_in, *patch)``, ``label`` uint8 teacher argmax,
``mask`` uint8 conditioning mask) with one report ``volume_XXXX.json`` each, ``synthesis.json`` (the manifest:
settings, teacher) and ``summary.json``. :func:`synthesize_set` makes (or resumably completes) one;
:func:`synthesize_from_teacher` does it for a teacher checkpoint and records the checkpoint's SHA-256.

Reuse. A set is reused only for the same teacher (its fingerprint) *and* the same synthesis settings
(:func:`synthesis_settings`: inversion settings, mask augmentation, seed, batch size); see :func:`usable_set`.
A set made with other settings (for example a 50-iteration demo set) is therefore never taken for a real run.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.synthesis.inversion import InversionConfig, invert, stats_weight_warning
from nnunetv2_cimis.synthesis.mask_augmentation import MaskAugmentation, conditioning_masks, sanitize_mask

#: sub-folder of a fold folder where a set is written by default (``nnUNetv2_cimis_synthesize`` next to the
#: teacher's checkpoint; ``nnUNetTrainerMOSInv`` next to the student's)
DEFAULT_SUBFOLDER = "mosinv_synthetic"

SYNTHESIS_MANIFEST = "synthesis.json"
SYNTHESIS_SUMMARY = "summary.json"
SET_FORMAT_VERSION = 1
#: manifest entries that are information only (not compared when a set is resumed or reused)
MANIFEST_INFO_KEYS = ("num_volumes", "teacher_checkpoint", "created_by")


def volume_name(i: int) -> str:
    return f"volume_{i:04d}"


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (identifies the teacher checkpoint a synthetic set was made from)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def existing_volumes(folder: str) -> List[int]:
    """Indices of the complete volumes (``volume_XXXX.npz`` with its report) in ``folder``."""
    import re

    if not os.path.isdir(folder):
        return []
    out = []
    for f in os.listdir(folder):
        m = re.fullmatch(r"volume_(\d{4,})\.npz", f)
        if m and os.path.isfile(os.path.join(folder, f[:-4] + ".json")):
            out.append(int(m.group(1)))
    return sorted(out)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=2)

    _write_atomic(path, write)


def synthesize_set(network: nn.Module, memory, num_input_channels: int, output_folder: str, num_volumes: int,
                   config: Optional[InversionConfig] = None, batch_size: int = 2, seed: int = 0,
                   augmentation: Optional[MaskAugmentation] = None, num_classes: Optional[int] = None,
                   manifest_extra: Optional[dict] = None, device: Optional[torch.device] = None,
                   show_progress: bool = True, log: Optional[Callable[[str], None]] = None) -> List[int]:
    """Generate ``num_volumes`` synthetic volumes into ``output_folder``; resumable.

    Volume ``i`` is conditioned on mask ``rng.integers(len(masks))`` of :func:`conditioning_masks` varied by
    ``augmentation``, with ``rng`` seeded by ``(seed, i)``, and starts from Gaussian noise seeded the same way,
    so an interrupted run resumes with the same assignment. Volumes already in the folder are kept; missing
    ones are generated ``batch_size`` at a time (batch statistics are pooled over a batch).

    Written per volume: ``volume_XXXX.npz`` (``image`` float32 ``(C_in, *patch)``, ``label`` uint8 teacher
    argmax, ``mask`` uint8 conditioning mask) and ``volume_XXXX.json`` (its report, see
    :class:`InversionResult`); for the set: ``synthesis.json`` (settings, teacher) and ``summary.json``.

    Args:
        network: the teacher (frozen; see :func:`invert`).
        memory: the teacher's ``StepMemory`` (``norm_stats`` and label bank).
        num_input_channels: input channels of the network.
        output_folder: where the set is written (created).
        num_volumes: total number of volumes wanted (>= 1).
        config: inversion settings. batch_size: volumes optimised together. seed: base seed.
        augmentation: mask variation (default :class:`MaskAugmentation()`).
        num_classes: outputs of the network; mask values outside become background (default: the memory's).
        manifest_extra: recorded in ``synthesis.json`` (e.g. ``teacher_fingerprint``); a folder whose manifest
            disagrees on these keys or on the settings is refused (except :data:`MANIFEST_INFO_KEYS`).
        device: where to optimise (default: the network's).

    Returns:
        The indices of all volumes of the set (``0 .. num_volumes - 1``).

    Raises:
        ValueError: bad arguments, a memory without statistics or masks, or a folder made with other settings.
    """
    from tqdm import tqdm

    cfg = config or InversionConfig()
    aug = augmentation or MaskAugmentation()
    if num_volumes < 1 or batch_size < 1:
        raise ValueError(f"num_volumes and batch_size must be >= 1, got {num_volumes}, {batch_size}")
    if not memory.norm_stats:
        raise ValueError("the step memory holds no normalisation statistics; recompute it")
    masks = conditioning_masks(memory)
    if not masks:
        raise ValueError("the step memory's label bank is empty: no mask to condition on")
    if num_classes is None:
        num_classes = max(memory.labels) + 1
    shapes = {tuple(sanitize_mask(m, 1).shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"the conditioning masks have different shapes {sorted(shapes)}; every step must use the "
                         f"plans (patch size) of the first step")
    if device is None:
        p = next(network.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    os.makedirs(output_folder, exist_ok=True)
    warning = stats_weight_warning(cfg.stats_weight)
    if warning is not None:
        import warnings
        warnings.warn(warning, stacklevel=2)
        if log is not None:
            log(f"WARNING: {warning}")
    manifest = {"format_version": SET_FORMAT_VERSION, **synthesis_settings(cfg, aug, seed, batch_size),
                "num_input_channels": int(num_input_channels),
                "num_classes": int(num_classes),
                "patch_size": [int(v) for v in (memory.patch_size or sanitize_mask(masks[0], 1).shape)],
                "num_masks": len(masks), **(manifest_extra or {})}
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, so comparisons with a loaded one work
    mpath = os.path.join(output_folder, SYNTHESIS_MANIFEST)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        differs = sorted(k for k in set(old) | set(manifest)
                         if k not in MANIFEST_INFO_KEYS and old.get(k) != manifest.get(k))
        if differs:
            raise ValueError(f"{output_folder} holds a synthetic set made with other settings ({differs}); "
                             f"use another output folder or delete it")
    manifest["num_volumes"] = max(int(num_volumes), len(existing_volumes(output_folder)))
    _write_json(mpath, manifest)

    done = set(existing_volumes(output_folder))
    todo = [i for i in range(num_volumes) if i not in done]
    if log is not None:
        log(f"Synthetic set {output_folder}: {len(done)} volumes present, {len(todo)} to generate "
            f"({cfg.iterations} iterations each)")
    bar = tqdm(total=len(todo) * max(int(cfg.iterations), 1), disable=not show_progress or not todo,
               desc="inversion", unit="it")
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            cond, inits = [], []
            for i in idx:
                rng = np.random.default_rng([int(seed), int(i)])
                base = masks[int(rng.integers(len(masks)))]
                cond.append(sanitize_mask(aug(sanitize_mask(base, num_classes).astype(np.uint8), rng), num_classes))
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
                inits.append(torch.randn((num_input_channels,) + cond[-1].shape, generator=g) * cfg.init_std)
            m = torch.from_numpy(np.stack(cond)).long().to(device)
            x0 = torch.stack(inits).to(device)

            def progress(it, loss):
                bar.update(1)
                if it % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}", volumes=f"{idx[0]}-{idx[-1]}")

            res = invert(network, m, memory.norm_stats, num_input_channels, cfg, init=x0, progress=progress)
            for j, i in enumerate(idx):
                name = os.path.join(output_folder, volume_name(i))

                def save_npz(p, j=j):
                    with open(p, "wb") as f:
                        np.savez(f, image=res.images[j].numpy().astype(np.float32),
                                 label=res.labels[j].numpy().astype(np.uint8), mask=cond[j].astype(np.uint8))

                _write_atomic(name + ".npz", save_npz)
                report = dict(res.reports[j], index=int(i), batch=[int(k) for k in idx])
                _write_json(name + ".json", report)
    finally:
        bar.close()
    write_summary(output_folder)
    return list(range(num_volumes))


def write_summary(folder: str) -> dict:
    """Aggregate the per-volume reports of a set into ``summary.json`` and return it."""
    reports = []
    for i in existing_volumes(folder):
        with open(os.path.join(folder, volume_name(i) + ".json")) as f:
            reports.append(json.load(f))

    def agg(key):
        v = [r[key] for r in reports if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} if v else None

    summary = {"num_volumes": len(reports), "mean_dice": agg("mean_dice"), "stats_distance": agg("stats_distance"),
               "stats_distance_start": agg("stats_distance_start"),
               "per_volume": {volume_name(r["index"]): {"mean_dice": r["mean_dice"],
                                                        "stats_distance": r["stats_distance"]} for r in reports}}
    _write_json(os.path.join(folder, SYNTHESIS_SUMMARY), summary)
    return summary


def read_manifest(folder: str) -> Optional[dict]:
    """The ``synthesis.json`` of a set, or None when there is none."""
    path = os.path.join(folder, SYNTHESIS_MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_synthetic_set(folder: str, indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read the volumes of a set: ``(images (N, C_in, *patch) float32, labels (N, *patch) uint8)``."""
    idx = existing_volumes(folder) if indices is None else list(indices)
    if not idx:
        raise ValueError(f"{folder} holds no synthetic volume")
    images, labels = [], []
    for i in idx:
        with np.load(os.path.join(folder, volume_name(i) + ".npz")) as d:
            images.append(d["image"])
            labels.append(d["label"])
    return np.stack(images), np.stack(labels)


def synthesis_settings(config: InversionConfig, augmentation: MaskAugmentation, seed: int,
                       batch_size: int) -> dict:
    """What decides a set's volumes besides the teacher and its memory: inversion settings, mask augmentation,
    base seed, batch size (statistics are pooled over a batch). Written into the manifest; the reuse key of
    :func:`usable_set`. JSON-normalised (tuples as lists) so that it compares equal to a loaded manifest."""
    return json.loads(json.dumps({"config": asdict(config), "augmentation": asdict(augmentation),
                                  "seed": int(seed), "batch_size": int(batch_size)}))


def usable_set(folder: str, fingerprint: str, min_volumes: int, settings: Optional[dict] = None) -> bool:
    """True when ``folder`` holds a set of the teacher with SHA-256 ``fingerprint`` with at least
    ``min_volumes`` volumes and, if ``settings`` is given (:func:`synthesis_settings`), made with exactly those
    settings."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("teacher_fingerprint") != fingerprint:
        return False
    if settings is not None and any(manifest.get(k) != v for k, v in settings.items()):
        return False
    return len(existing_volumes(folder)) >= min_volumes


def default_output_folder(checkpoint_path: str) -> str:
    """``<fold folder>/mosinv_synthetic``: next to the teacher checkpoint."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), DEFAULT_SUBFOLDER)


def synthesize_from_teacher(checkpoint_path: str, network: torch.nn.Module, memory, num_input_channels: int,
                            output_folder: str, num_volumes: int, config: InversionConfig, batch_size: int = 2,
                            seed: int = 0, augmentation: Optional[MaskAugmentation] = None,
                            device: Optional[torch.device] = None, show_progress: bool = True,
                            log: Optional[Callable[[str], None]] = None):
    """:func:`synthesize_set` for a teacher checkpoint: the set records the checkpoint's SHA-256, so a folder
    made from another model is refused (CIMISError) instead of being silently reused."""
    if memory.patch_size and memory.label_bank:
        bank_shape = list(memory.label_bank[0].shape[-len(memory.patch_size):])
        if bank_shape != list(memory.patch_size):
            raise CIMISError(f"The step memory's label patches have shape {bank_shape} but its patch size is "
                             f"{memory.patch_size}; recompute it with nnUNetv2_cimis_step_memory.")
    extra = {"teacher_fingerprint": file_fingerprint(checkpoint_path),
             "teacher_checkpoint": os.path.abspath(checkpoint_path)}
    try:
        return synthesize_set(network, memory, num_input_channels, output_folder, num_volumes, config,
                              batch_size=batch_size, seed=seed, augmentation=augmentation,
                              num_classes=max(memory.labels) + 1, manifest_extra=extra, device=device,
                              show_progress=show_progress, log=log)
    except ValueError as e:
        raise CIMISError(f"Synthesis into {output_folder} failed: {e}") from None

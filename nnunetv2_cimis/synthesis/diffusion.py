"""Unconditional diffusion models for replay: train, save, load, sample, a resumable sample cache, and the
records that list a step's replay models in its step memory (:func:`replay_model_record`,
:func:`resolve_replay_folder`).

Glue around the ``diffusers`` library (``UNet2DModel``, ``DDPMScheduler`` for training, ``DDIMScheduler``
for fast sampling); the model, noise schedule and sampler are the library's, not re-implemented here.
Used by the diffusion-driven distillation method (Zhao et al., IJCARS 2025; docs/methods_ddcl.md): when a
step ends, a small unconditional DDPM is trained on that step's training images; at later steps, images
sampled from it are mixed into training so the teacher can distil its old-class knowledge on them.

Data layout. Images are ``(N, C, S, S)`` float tensors in the *network's input scale* (nnU-Net's
preprocessed, normalised intensities). :class:`IntensityScaler` maps them per channel to [-1, 1] (the
DDPM's range) with the 0.5 / 99.5 percentiles of the training images, and back; it is saved with the
model, so sampled images come back in the scale the segmentation network expects.

Folder of a saved model::

    <folder>/unet/               UNet2DModel.save_pretrained
    <folder>/scheduler/          DDPMScheduler.save_pretrained
    <folder>/cimis_diffusion.json  image size, channels, scaler, training record

Cache of samples (:class:`SyntheticImageCache`): one ``sample_XXXXX.npy`` per image plus ``cache.json``
describing what produced them. Sample ``i`` depends only on its own seed (``seed``, ``i``) because the
DDIM sampler is run with ``eta = 0`` (deterministic) from per-sample initial noise, so an interrupted
sampling run resumes where it stopped and produces the same images as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_cimis.errors import CIMISError

META_FILENAME = "cimis_diffusion.json"
CACHE_META_FILENAME = "cache.json"
FORMAT_VERSION = 1


DDCL_EXTRA_HINT = 'pip install "nnunetv2-cimis[ddcl]"'


def require_diffusers():
    """Import ``diffusers`` (an optional dependency, the extra ``ddcl``) or raise a CIMISError naming the extra."""
    try:
        import diffusers
    except ImportError:
        raise CIMISError(f"nnUNetTrainerDDCL's diffusion replay needs the package 'diffusers', which is not "
                         f"installed. It is the optional extra 'ddcl' of nnunetv2-cimis: install it with "
                         f"{DDCL_EXTRA_HINT} (or, from a source checkout, pip install -e \".[ddcl]\").") from None
    return diffusers


_require_diffusers = require_diffusers


@dataclass
class DiffusionConfig:
    """Hyperparameters of the replay DDPM. Defaults are small and CPU-friendly (a choice, not the paper's).

    Attributes:
        image_size: side ``S`` of the square images the model generates (default 32).
        block_channels: channels per UNet2DModel resolution level (default (32, 64); multiples of
            ``norm_groups``).
        layers_per_block: ResNet blocks per level (default 1).
        norm_groups: GroupNorm groups (default 8).
        num_train_timesteps: DDPM noise steps T (default 1000, the DDPM paper's value).
        beta_schedule: diffusers beta schedule (default "squaredcos_cap_v2", better at few sampling steps).
        prediction_type: what the network predicts, diffusers' ``"epsilon"`` (the DDPM paper's noise),
            ``"sample"`` (the clean image) or ``"v_prediction"`` (default "epsilon").
        train_iterations: optimisation steps (default 200).
        batch_size: images per step (default 16).
        learning_rate: AdamW learning rate (default 1e-3).
        sampling_steps: DDIM steps when sampling (default 25).
        seed: random seed of training (default 0).
    """

    image_size: int = 32
    block_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    train_iterations: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    sampling_steps: int = 25
    seed: int = 0

    def __post_init__(self):
        self.block_channels = tuple(int(c) for c in self.block_channels)
        for name in ("image_size", "layers_per_block", "norm_groups", "num_train_timesteps", "train_iterations",
                     "batch_size", "sampling_steps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"DiffusionConfig.{name} must be a positive integer, got {v!r}")
        if not self.block_channels or any(c < 1 or c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"DiffusionConfig.block_channels must be positive multiples of norm_groups="
                             f"{self.norm_groups}, got {self.block_channels}")
        down = 2 ** (len(self.block_channels) - 1)
        if self.image_size % down:
            raise ValueError(f"DiffusionConfig.image_size={self.image_size} must be divisible by {down} "
                             f"(2 ** (levels - 1)) for block_channels={self.block_channels}")
        if self.sampling_steps > self.num_train_timesteps:
            raise ValueError(f"sampling_steps ({self.sampling_steps}) cannot exceed num_train_timesteps "
                             f"({self.num_train_timesteps})")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"DiffusionConfig.prediction_type must be 'epsilon', 'sample' or 'v_prediction', got "
                             f"{self.prediction_type!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"DiffusionConfig.learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class IntensityScaler:
    """Per-channel affine map between network-input intensities and the DDPM's [-1, 1] range."""

    low: List[float]
    high: List[float]

    @classmethod
    def fit(cls, images: torch.Tensor, lower_percentile: float = 0.5, upper_percentile: float = 99.5):
        """Fit on ``(N, C, ...)`` images: ``low``/``high`` = channel percentiles (equal ones are widened)."""
        x = images.detach().float().transpose(0, 1).reshape(images.shape[1], -1).cpu().numpy()
        low = np.percentile(x, lower_percentile, axis=1)
        high = np.percentile(x, upper_percentile, axis=1)
        high = np.where(high - low < 1e-6, low + 1.0, high)
        return cls([float(v) for v in low], [float(v) for v in high])

    def _lh(self, x: torch.Tensor):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (torch.tensor(self.low, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.high, dtype=x.dtype, device=x.device).view(shape))

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._lh(x)
        return ((x - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._lh(x)
        return (x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo


@dataclass
class DiffusionModel:
    """A loaded (or freshly trained) replay model: network, training scheduler config, scaler, metadata."""

    unet: torch.nn.Module
    scheduler_config: dict
    scaler: IntensityScaler
    config: DiffusionConfig
    num_channels: int
    meta: dict = field(default_factory=dict)
    folder: Optional[str] = None


def build_unet(config: DiffusionConfig, num_channels: int):
    """A diffusers ``UNet2DModel`` for ``num_channels``-channel ``config.image_size`` images, plus its DDPM scheduler."""
    _require_diffusers()
    from diffusers import DDPMScheduler, UNet2DModel
    n = len(config.block_channels)
    unet = UNet2DModel(sample_size=config.image_size, in_channels=num_channels, out_channels=num_channels,
                       layers_per_block=config.layers_per_block, block_out_channels=config.block_channels,
                       down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                       norm_num_groups=config.norm_groups)
    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                              prediction_type=config.prediction_type)
    return unet, scheduler


def crops_for_diffusion(image: np.ndarray, patch_size: Sequence[int], image_size: int, num_crops: int,
                        rng: np.random.Generator) -> torch.Tensor:
    """Random ``patch_size`` crops of a ``(C, X, Y)`` (or nnU-Net 2D ``(C, 1, X, Y)``) image, resized to ``image_size``.

    The replay model thus learns patches at the segmentation network's field of view, and its samples
    are resized back to ``patch_size`` when mixed into training. Images smaller than the patch are
    zero-padded (nnU-Net pads the same way). Returns ``(num_crops, C, image_size, image_size)``.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 4 and img.shape[1] == 1:
        img = img[:, 0]
    if img.ndim != 3:
        raise ValueError(f"expected a (C, X, Y) or (C, 1, X, Y) image, got shape {tuple(np.shape(image))}")
    px, py = int(patch_size[-2]), int(patch_size[-1])
    pad = [(0, 0), (0, max(0, px - img.shape[1])), (0, max(0, py - img.shape[2]))]
    img = np.pad(img, pad)
    out = []
    for _ in range(num_crops):
        x0 = int(rng.integers(0, img.shape[1] - px + 1))
        y0 = int(rng.integers(0, img.shape[2] - py + 1))
        out.append(img[:, x0:x0 + px, y0:y0 + py])
    t = torch.from_numpy(np.stack(out))
    return F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)


def train_diffusion_model(images: torch.Tensor, config: DiffusionConfig, device: torch.device = torch.device("cpu"),
                          log: Callable[[str], None] = print, log_every: int = 100) -> DiffusionModel:
    """Train an unconditional DDPM on ``images`` ``(N, C, S, S)`` (network-input scale, ``S = config.image_size``).

    MSE on the ``config.prediction_type`` target (noise: the DDPM objective), AdamW, random horizontal /
    vertical flips.

    Raises:
        ValueError: images of the wrong shape or size, or fewer than one image.
    """
    if images.ndim != 4 or images.shape[-1] != config.image_size or images.shape[-2] != config.image_size:
        raise ValueError(f"images must be (N, C, {config.image_size}, {config.image_size}), got "
                         f"{tuple(images.shape)}; resize them with crops_for_diffusion")
    if images.shape[0] < 1:
        raise ValueError("no images to train the diffusion model on")
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    scaler = IntensityScaler.fit(images)
    data = scaler.to_model(images.float()).to(device)
    unet, scheduler = build_unet(config, images.shape[1])
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    t0 = time.time()
    losses = []
    for it in range(config.train_iterations):
        idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=g)
        x = data[idx.to(device)]
        flips = torch.rand(2, generator=g)
        if flips[0] < 0.5:
            x = x.flip(-1)
        if flips[1] < 0.5:
            x = x.flip(-2)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), generator=g).to(device)
        noisy = scheduler.add_noise(x, noise, t)
        if config.prediction_type == "epsilon":
            goal = noise
        elif config.prediction_type == "sample":
            goal = x
        else:
            goal = scheduler.get_velocity(x, noise, t)
        loss = F.mse_loss(unet(noisy, t).sample, goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and ((it + 1) % log_every == 0 or it + 1 == config.train_iterations):
            log(f"diffusion training {it + 1}/{config.train_iterations}: loss {np.mean(losses[-log_every:]):.4f}")
    seconds = time.time() - t0
    unet.eval()
    meta = {"train_seconds": seconds, "train_images": int(images.shape[0]),
            "final_loss": float(np.mean(losses[-min(len(losses), 50):]))}
    return DiffusionModel(unet=unet, scheduler_config=dict(scheduler.config), scaler=scaler, config=config,
                          num_channels=int(images.shape[1]), meta=meta)


def save_diffusion_model(model: DiffusionModel, folder: str, extra_meta: Optional[dict] = None) -> str:
    """Write ``model`` into ``folder`` (replacing it atomically: written next to it, then renamed)."""
    _require_diffusers()
    from diffusers import DDPMScheduler
    folder = os.path.abspath(folder)
    tmp = folder + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model.unet.save_pretrained(os.path.join(tmp, "unet"))
    DDPMScheduler.from_config(model.scheduler_config).save_pretrained(os.path.join(tmp, "scheduler"))
    meta = {"format_version": FORMAT_VERSION, "config": asdict(model.config), "num_channels": model.num_channels,
            "scaler": asdict(model.scaler), "meta": dict(model.meta, **(extra_meta or {}))}
    with open(os.path.join(tmp, META_FILENAME), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    model.folder = folder
    return folder


def load_diffusion_model(folder: str, device: torch.device = torch.device("cpu")) -> DiffusionModel:
    """Load a model written by :func:`save_diffusion_model`.

    Raises:
        CIMISError: the folder is missing or is not a complete replay model.
    """
    _require_diffusers()
    from diffusers import DDPMScheduler, UNet2DModel
    meta_path = os.path.join(folder, META_FILENAME)
    if not os.path.isfile(meta_path):
        raise CIMISError(f"No diffusion model at {folder} (missing {META_FILENAME}). It is written when a step "
                         f"trained with nnUNetTrainerDDCL ends; retrain that step with nnUNetTrainerDDCL.")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = meta["config"]
        config = DiffusionConfig(**dict(cfg, block_channels=tuple(cfg["block_channels"])))
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).to(device).eval()
        scheduler = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise CIMISError(f"The diffusion model in {folder} cannot be read ({e}); retrain the step that wrote it "
                         f"with nnUNetTrainerDDCL.") from None
    return DiffusionModel(unet=unet, scheduler_config=dict(scheduler.config), scaler=IntensityScaler(**meta["scaler"]),
                          config=config, num_channels=int(meta["num_channels"]), meta=meta.get("meta", {}),
                          folder=os.path.abspath(folder))


def _initial_noise(model: DiffusionModel, seed: int, indices: Sequence[int]) -> torch.Tensor:
    s = model.config.image_size
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        out.append(torch.randn((model.num_channels, s, s), generator=g))
    return torch.stack(out)


@torch.no_grad()
def sample_images(model: DiffusionModel, indices: Sequence[int], sampling_steps: Optional[int] = None, seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Sample one image per index with DDIM (``eta = 0``); image ``i`` depends only on ``(seed, i)``.

    Returns ``(len(indices), C, S, S)`` in the network-input scale.
    """
    _require_diffusers()
    from diffusers import DDIMScheduler
    steps = model.config.sampling_steps if sampling_steps is None else int(sampling_steps)
    if steps < 1:
        raise ValueError(f"sampling_steps must be >= 1, got {steps}")
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    unet = model.unet.to(device).eval()
    x = _initial_noise(model, seed, indices).to(device)
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return model.scaler.from_model(x.cpu())


def _folder_fingerprint(folder: str) -> str:
    """Hash of a model's metadata and weights' size and modification time (changes when it is retrained)."""
    h = hashlib.sha1()
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


class SyntheticImageCache:
    """Samples from one or more replay models, written once to ``folder`` and reused (resumable).

    Args:
        folder: cache folder (created).
        model_folders: saved replay models; sample ``i`` comes from model ``i % len(model_folders)``.
        num_samples: number of images.
        sampling_steps: DDIM steps (None: each model's own ``config.sampling_steps``).
        seed: sampling seed.
        batch_size: images sampled per forward pass (does not change the images).

    If ``cache.json`` in ``folder`` describes other models, steps or seed, the old samples are deleted;
    with the same description, existing samples are kept and only the missing ones are drawn.
    """

    def __init__(self, folder: str, model_folders: Sequence[str], num_samples: int, sampling_steps: Optional[int] = None,
                 seed: int = 0, batch_size: int = 8):
        if not model_folders:
            raise ValueError("model_folders is empty: there is no replay model to sample from")
        if int(num_samples) < 1 or int(batch_size) < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        self.folder = folder
        self.model_folders = [os.path.abspath(m) for m in model_folders]
        self.num_samples, self.sampling_steps, self.seed, self.batch_size = int(num_samples), sampling_steps, seed, int(batch_size)

    def _description(self) -> dict:
        return {"format_version": FORMAT_VERSION, "models": [[m, _folder_fingerprint(m)] for m in self.model_folders],
                "sampling_steps": self.sampling_steps, "seed": self.seed}

    def path(self, i: int) -> str:
        return os.path.join(self.folder, f"sample_{i:05d}.npy")

    def missing(self) -> List[int]:
        return [i for i in range(self.num_samples) if not os.path.isfile(self.path(i))]

    def ensure(self, device: torch.device = torch.device("cpu"), log: Callable[[str], None] = print) -> dict:
        """Draw the missing samples; returns ``{"sampled": n, "seconds": s, "seconds_per_image": s / n}``."""
        for m in self.model_folders:
            if not os.path.isfile(os.path.join(m, META_FILENAME)):
                raise CIMISError(f"No diffusion model at {m}; retrain the step that should have written it with "
                                 f"nnUNetTrainerDDCL.")
        os.makedirs(self.folder, exist_ok=True)
        desc = self._description()
        meta_path = os.path.join(self.folder, CACHE_META_FILENAME)
        if os.path.isfile(meta_path):
            try:
                with open(meta_path) as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError):
                old = None
            if old != desc:
                log(f"synthetic image cache {self.folder} was made by other models or settings: resampling")
                for name in os.listdir(self.folder):
                    if name.startswith("sample_") and name.endswith(".npy"):
                        os.remove(os.path.join(self.folder, name))
        with open(meta_path + ".tmp", "w") as f:
            json.dump(desc, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
        todo = self.missing()
        t0 = time.time()
        by_model = {}
        for i in todo:
            by_model.setdefault(i % len(self.model_folders), []).append(i)
        for mi, indices in sorted(by_model.items()):
            model = load_diffusion_model(self.model_folders[mi], device)
            for b in range(0, len(indices), self.batch_size):
                chunk = indices[b:b + self.batch_size]
                imgs = sample_images(model, chunk, self.sampling_steps, self.seed, device)
                for i, img in zip(chunk, imgs):
                    tmp = self.path(i)[:-4] + ".tmp.npy"
                    np.save(tmp, img.numpy().astype(np.float32))
                    os.replace(tmp, self.path(i))
            log(f"sampled {len(indices)} synthetic images from {self.model_folders[mi]}")
        seconds = time.time() - t0
        return {"sampled": len(todo), "seconds": seconds, "seconds_per_image": seconds / len(todo) if todo else 0.0}

    def load(self) -> torch.Tensor:
        """All samples as ``(num_samples, C, S, S)``; call :meth:`ensure` first."""
        missing = self.missing()
        if missing:
            raise CIMISError(f"{len(missing)} synthetic images are missing in {self.folder}; call ensure() first")
        return torch.from_numpy(np.stack([np.load(self.path(i)) for i in range(self.num_samples)]))


# ------------------------------------------------------------------ records of replay models in a step memory
def _results_folder() -> Optional[str]:
    from nnunetv2.paths import nnUNet_results
    return nnUNet_results.get() if nnUNet_results.is_set() else None


def replay_model_record(folder: str, step: int) -> dict:
    """A step-memory record of a saved replay model: the step, its absolute folder, and the folder relative to
    ``nnUNet_results`` (None when it lies outside), so the record survives moving ``nnUNet_results``."""
    folder = os.path.abspath(folder)
    results = _results_folder()
    rel = None
    if results and os.path.commonpath([folder, os.path.abspath(results)]) == os.path.abspath(results):
        rel = os.path.relpath(folder, results)
    return {"step": int(step), "folder": folder, "relative_to_results": rel}


def resolve_replay_folder(entry: dict) -> str:
    """The folder of a recorded replay model (:func:`replay_model_record`): the absolute path, or the path
    relative to the current ``nnUNet_results`` when the results were moved.

    Raises:
        CIMISError: neither exists (the message says how to train without replay).
    """
    if os.path.isdir(entry.get("folder", "")):
        return entry["folder"]
    results = _results_folder()
    if results and entry.get("relative_to_results"):
        p = os.path.join(results, entry["relative_to_results"])
        if os.path.isdir(p):
            return p
    raise CIMISError(f"The diffusion model of step {entry.get('step')} is missing (recorded at {entry.get('folder')}, "
                     f"relative to nnUNet_results: {entry.get('relative_to_results')}). Restore that folder, or set "
                     f"the hyperparameter missing_replay_model to 'skip' to train without replay.")

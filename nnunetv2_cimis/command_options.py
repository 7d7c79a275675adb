"""The options every console command of the package shares: ``--version`` and ``-device``."""
from __future__ import annotations

import argparse
from typing import Optional

from nnunetv2_cimis import __version__


def version_string() -> str:
    """``nnunetv2-cimis X.Y.Z (nnunetv2 A.B.C)``: the package's version (from ``nnunetv2_cimis.__version__``,
    the one place it is written) and the nnU-Net it runs on."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            nnunet = version("nnunetv2")
        except PackageNotFoundError:
            nnunet = "not installed"
    except ImportError:  # pragma: no cover - Python < 3.8
        nnunet = "unknown"
    return f"nnunetv2-cimis {__version__} (nnunetv2 {nnunet})"


def add_version_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command's parser ``--version`` (every console command of the package calls this)."""
    parser.add_argument("--version", action="version", version=version_string(),
                        help="print the versions of nnunetv2-cimis and nnunetv2 and exit")
    return parser


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (what nnU-Net's commands pick by default is ``cuda``)."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: Optional[str]):
    """``-device`` value (``cuda``, ``cuda:N``, ``cpu``, ``mps`` or None for the default) -> ``torch.device``.

    Raises CIMISError when a GPU is asked for but none is visible, instead of a CUDA traceback later.
    """
    import torch

    from nnunetv2_cimis.errors import CIMISError
    name = name or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CIMISError(f"unknown device {name!r}: use cuda, cuda:N, cpu or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CIMISError(f"-device {name} was given but PyTorch sees no CUDA GPU on this machine: run with "
                         f"-device cpu (see the CPU recipe in docs/usage.md)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CIMISError(f"-device {name} was given but PyTorch sees no Apple MPS device: run with -device cpu")
    return device


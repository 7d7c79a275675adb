"""The plain network behind training wrappers: the one ``unwrap_network`` of the package.

nnU-Net wraps its network in ``torch.compile`` (an ``OptimizedModule`` holding the real module in
``_orig_mod``) when ``nnUNet_compile`` is on, and in ``DistributedDataParallel`` (``module``) for multi-GPU
training. Module names, state dicts and attributes such as ``decoder.deep_supervision`` belong to the plain
module; every place that needs them unwraps with :func:`unwrap_network`.
"""
from __future__ import annotations

from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the plain module behind DistributedDataParallel / DataParallel and torch.compile wrappers
    (any nesting of them); a plain module is returned as it is."""
    mod = network
    while True:
        if isinstance(mod, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            mod = mod.module
        elif hasattr(mod, "_orig_mod"):
            mod = mod._orig_mod
        else:
            return mod

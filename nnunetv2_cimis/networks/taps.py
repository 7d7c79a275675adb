"""Feature taps: capture intermediate features of a network by module path.

A tap is a forward hook on a submodule named by a dotted path relative to the (unwrapped) network, where
integer parts index ``nn.ModuleList`` / ``nn.Sequential`` children and may be negative:
``"decoder.stages.-2"`` is the second-to-last decoder stage of nnU-Net's U-Net, ``"encoder.stages.-1"`` its
bottleneck. Incremental methods declare the taps they need; the base trainer installs them on student and
teacher.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.networks.unwrap import unwrap_network


def resolve_module(network: nn.Module, path: str) -> nn.Module:
    """Find the submodule at ``path`` (dotted, integer parts may be negative)."""
    mod = unwrap_network(network)
    walked = []
    for part in path.split("."):
        walked.append(part)
        try:
            if re.fullmatch(r"-?\d+", part):
                children = list(mod.children()) if not isinstance(mod, (nn.ModuleList, nn.Sequential)) else mod
                mod = children[int(part)]
            else:
                mod = getattr(mod, part)
        except (AttributeError, IndexError, TypeError):
            raise CIMISError(f"The network has no module at '{'.'.join(walked)}' (tap path '{path}'). Module paths "
                             f"look like 'decoder.stages.-2' or 'encoder.stages.-1'.") from None
        if not isinstance(mod, nn.Module):
            raise CIMISError(f"'{'.'.join(walked)}' in tap path '{path}' is not a module")
    return mod


class FeatureTaps:
    """Forward hooks that store the outputs of named submodules at every forward pass.

    Args:
        network: the network (wrapped or not).
        taps: tap name -> module path.
        detach: store detached outputs (for a frozen teacher).

    ``features`` maps each tap name to the output of its module at the last forward pass. Call
    :meth:`clear` to drop references and :meth:`remove` to uninstall the hooks.
    """

    def __init__(self, network: nn.Module, taps: Mapping[str, str], detach: bool = False):
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = []
        self.paths = dict(taps)
        for name, path in self.paths.items():
            module = resolve_module(network, path)
            self._handles.append(module.register_forward_hook(self._make_hook(name, detach)))

    def _make_hook(self, name: str, detach: bool):
        def hook(_module, _inputs, output):
            if isinstance(output, (list, tuple)):
                output = output[0]
            self.features[name] = output.detach() if detach else output
        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

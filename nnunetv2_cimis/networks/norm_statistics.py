"""Per-channel statistics of the inputs of a network's normalisation layers: the one recorder.

Two places read these statistics and must name the layers the same way:

* the step memory (:func:`nnunetv2_cimis.memory.compute.compute_step_memory`) accumulates, over a step's
  training patches, the mean and variance of every normalisation layer's input (``StepMemory.norm_stats``);
* MOSInversion (:func:`nnunetv2_cimis.synthesis.inversion.invert`) records the same layers' input statistics
  of the synthetic batch at every iteration and matches them against the stored ones.

Both use :class:`NormInputRecorder`, and the one naming rule of :func:`norm_layers`: a layer's name is its
name in ``unwrap_network(network).named_modules()`` (the plain module behind torch.compile / DDP wrappers).
If the two ever named layers differently, the inversion would match nothing; ``tests/test_norm_statistics.py``
checks that the names written at a step's end are the names matched during inversion.

nnU-Net's networks use InstanceNorm, which keeps no running statistics; that is why they are recorded here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunetv2_cimis.networks.unwrap import unwrap_network

#: module types whose input statistics are recorded: BatchNorm / SyncBatchNorm / InstanceNorm (all
#: ``_NormBase``), GroupNorm and LayerNorm
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_layers(network: nn.Module) -> Dict[str, nn.Module]:
    """Name -> module of every normalisation layer, in module order; names as in the unwrapped network's
    ``named_modules()`` (the package's one naming rule for these layers)."""
    return {n: m for n, m in unwrap_network(network).named_modules() if isinstance(m, NORM_TYPES)}


def norm_layer_names(network: nn.Module) -> List[str]:
    """Names of every normalisation layer (:func:`norm_layers`), in module order."""
    return list(norm_layers(network))


def channel_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance of a ``(B, C, ...)`` tensor.

    Returns:
        ``(mean, var)``, each ``(B, C)``, computed over the spatial dimensions in float32 (differentiable).
    """
    if x.ndim < 3:
        raise ValueError(f"expected a (B, C, X[, Y, Z]) tensor, got shape {tuple(x.shape)}")
    f = x.float().flatten(2)
    return f.mean(dim=2), f.var(dim=2, unbiased=False)


def pool_statistics(mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool per-sample ``(B, C)`` statistics of equally sized samples into ``(C,)`` batch statistics.

    ``mean = mean_b(m_b)``, ``var = mean_b(v_b + m_b^2) - mean^2`` (the variance over all voxels of the batch).
    ``(C,)`` inputs are returned as they are.
    """
    if mean.ndim == 1:
        return mean, var
    m = mean.mean(dim=0)
    v = (var + mean ** 2).mean(dim=0) - m ** 2
    return m, v.clamp_min(0)


class NormInputRecorder:
    """Forward pre-hooks on normalisation layers recording per-channel statistics of their input.

    Two records, each optional:

    * ``batch_stats=True``: after every forward pass ``self.stats[name] = (mean, var)``, each ``(B, C)``
      (:func:`channel_statistics`), differentiable with respect to the network input (MOSInversion);
    * ``accumulate=True``: per channel, the sum and the sum of squares of the input over every sample and voxel
      of every forward pass, in float64 and detached; :meth:`result` turns them into the mean and (biased)
      variance over all of them (the step memory).

    Use as a context manager (hooks removed on exit) or call :meth:`close`.

    Args:
        network: the network; wrapped networks are fine (names follow :func:`norm_layers`).
        module_names: the layers to record; default: every normalisation layer (:func:`norm_layer_names`).
        batch_stats: keep the per-forward ``(B, C)`` statistics in ``self.stats``.
        accumulate: accumulate sums for :meth:`result`.

    Raises:
        ValueError: a requested name is not a module of the unwrapped network (the message lists a few
            normalisation layers that are).
    """

    def __init__(self, network: nn.Module, module_names: Optional[Sequence[str]] = None,
                 batch_stats: bool = True, accumulate: bool = False):
        modules = dict(unwrap_network(network).named_modules())
        names = norm_layer_names(network) if module_names is None else list(module_names)
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"modules {missing[:5]} are not in the network; its normalisation layers are e.g. "
                             f"{norm_layer_names(network)[:5]}. Network and statistics must come from the same "
                             f"architecture.")
        order = {n: i for i, n in enumerate(modules)}
        #: the recorded layers in module order (the first is the one closest to the input)
        self.names: List[str] = sorted(dict.fromkeys(names), key=lambda n: order[n])
        self.batch_stats = bool(batch_stats)
        self.accumulate = bool(accumulate)
        self.stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums: Dict[str, torch.Tensor] = {}
        self.squares: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, float] = {}
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, inputs):
            x = inputs[0]
            if self.batch_stats:
                self.stats[name] = channel_statistics(x)
            if self.accumulate:
                xd = x.detach().double()
                dims = [0] + list(range(2, xd.ndim))
                s, q = xd.sum(dims), (xd * xd).sum(dims)
                n = xd.numel() / xd.shape[1]
                if name in self.sums:
                    self.sums[name] += s
                    self.squares[name] += q
                    self.counts[name] += n
                else:
                    self.sums[name], self.squares[name], self.counts[name] = s, q, n
        return hook

    def result(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Accumulated statistics: name -> ``{"mean": (C,), "var": (C,)}`` (float32, CPU), the layout of
        ``StepMemory.norm_stats``; layers never reached by a forward pass are left out."""
        out = {}
        for k in self.sums:
            mean = self.sums[k] / self.counts[k]
            var = (self.squares[k] / self.counts[k] - mean * mean).clamp_min(0)
            out[k] = {"mean": mean.float().cpu(), "var": var.float().cpu()}
        return out

    def clear(self) -> None:
        """Forget the per-forward statistics (the accumulated sums are kept)."""
        self.stats = {}

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    remove = close

    def __enter__(self) -> "NormInputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

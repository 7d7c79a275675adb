"""The one recorder of normalisation-layer input statistics (nnunetv2_cimis.networks.norm_statistics) and its one
naming rule: the layer names written into a step memory at a step's end are the names MOSInversion matches."""
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_cimis.memory.compute import compute_step_memory
from nnunetv2_cimis.networks.norm_statistics import NormInputRecorder, norm_layer_names
from nnunetv2_cimis.networks.unwrap import unwrap_network
from nnunetv2_cimis.synthesis.inversion import InversionConfig, invert


def _unet():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 8], nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


class _Compiled(nn.Module):
    """Stands for torch.compile's OptimizedModule (the real module in ``_orig_mod``), the way nnU-Net wraps it."""

    def __init__(self, mod):
        super().__init__()
        self._orig_mod = mod

    def forward(self, x):
        return self._orig_mod(x)


class _Dataset:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.cases = {}
        for key in ("a", "b"):
            seg = np.zeros((1, 12, 12, 12), dtype=np.int8)
            seg[0, 2:6, 2:6, 2:6] = 1
            seg[0, 7:10, 6:10, 3:8] = 2
            self.cases[key] = (rng.normal(size=(1, 12, 12, 12)).astype(np.float32) + seg, seg)

    def load_case(self, identifier):
        data, seg = self.cases[identifier]
        return data, seg, None, {}


def test_names_recorded_at_a_steps_end_are_the_names_matched_during_inversion():
    """compute_step_memory (the step's end) runs on the plain network, the inversion on the teacher as loaded and
    possibly wrapped: both name the layers by the one rule, so every stored layer is matched."""
    net = _unet()
    memory = compute_step_memory(net, _Dataset(), ["a", "b"], [8, 8, 8], {0: "bg", 1: "a", 2: "b"},
                                 torch.device("cpu"))
    stored = list(memory.norm_stats)
    assert stored == norm_layer_names(net) and len(stored) == 5  # one conv per stage: 3 encoder + 2 decoder
    wrapped = _Compiled(net)
    assert norm_layer_names(wrapped) == stored
    with NormInputRecorder(wrapped, stored) as rec:
        assert rec.names == stored
        wrapped(torch.randn(1, 1, 8, 8, 8))
        assert list(rec.stats) == stored
    # the inversion matches every stored layer (a layer without batch statistics would raise)
    masks = torch.from_numpy(np.stack([memory.label_bank[0]])).long()
    res = invert(wrapped, masks, memory.norm_stats, 1, InversionConfig(iterations=1), generator=torch.manual_seed(0))
    assert np.isfinite(res.reports[0]["stats_distance"])


def test_recorder_accumulates_like_the_numpy_statistics_and_names_plain_and_wrapped_alike():
    net = _unet()
    x1, x2 = torch.randn(2, 1, 8, 8, 8), torch.randn(1, 1, 8, 8, 8)
    first = norm_layer_names(net)[0]
    conv = unwrap_network(net).encoder.stages[0][0].convs[0].conv
    with NormInputRecorder(_Compiled(net), batch_stats=False, accumulate=True) as rec, torch.no_grad():
        net(x1)
        net(x2)
        assert rec.stats == {}  # per-forward statistics were not asked for
        inputs = torch.cat([conv(x1), conv(x2)]).double().numpy()
    got = rec.result()[first]
    per_channel = inputs.transpose(1, 0, 2, 3, 4).reshape(inputs.shape[1], -1)
    np.testing.assert_allclose(got["mean"].numpy(), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"].numpy(), per_channel.var(1), rtol=1e-4, atol=1e-6)
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())
    with pytest.raises(ValueError, match="not in the network"):
        NormInputRecorder(net, ["decoder.nothing"])


def test_unwrap_network_nested_wrappers():
    net = _unet()
    assert unwrap_network(_Compiled(nn.DataParallel(_Compiled(net)))) is net
    assert unwrap_network(net) is net

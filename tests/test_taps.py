"""Tests of nnunetv2_cimis.networks.taps: module paths, forward hooks, wrappers."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.networks.taps import FeatureTaps, resolve_module, unwrap_network


def _unet():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 8], nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)


class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class _TupleOut(nn.Module):
    def forward(self, x):
        return x + 1, x - 1


class _Toy(nn.Module):
    """x -> a (x2) -> blocks[0] (x2) -> blocks[1] (+1, returns a tuple) -> first element."""

    def __init__(self):
        super().__init__()
        self.a = _Doubler()
        self.blocks = nn.ModuleList([_Doubler(), _TupleOut()])
        self.flag = True

    def forward(self, x):
        x = self.blocks[0](self.a(x))
        return self.blocks[1](x)[0]


class _CompiledLike(nn.Module):
    """Stands for torch.compile's OptimizedModule: the real module is ``_orig_mod``."""

    def __init__(self, mod):
        super().__init__()
        self._orig_mod = mod

    def forward(self, x):
        return self._orig_mod(x)


def _ddp_like(mod):
    """A DistributedDataParallel instance holding ``mod`` without a process group (unwrapping only)."""
    w = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(w)
    w.module = mod
    return w


# ---------------------------------------------------------------- paths
def test_negative_and_positive_indices_on_unet():
    net = _unet()
    assert resolve_module(net, "decoder.stages.-2") is net.decoder.stages[-2]
    assert resolve_module(net, "decoder.stages.-2") is net.decoder.stages[0]
    assert resolve_module(net, "decoder.stages.-1") is net.decoder.stages[1]
    assert resolve_module(net, "encoder.stages.-1") is net.encoder.stages[2]
    assert resolve_module(net, "decoder.seg_layers.0") is net.decoder.seg_layers[0]
    assert resolve_module(net, "encoder.stages.0.0.convs.0.norm") is net.encoder.stages[0][0].convs[0].norm


def test_integer_part_on_a_plain_module_indexes_its_children():
    toy = _Toy()
    assert resolve_module(toy, "0") is toy.a  # children in registration order: a, blocks
    assert resolve_module(toy, "-1") is toy.blocks
    assert resolve_module(toy, "-1.-1") is toy.blocks[1]


@pytest.mark.parametrize("path,match", [
    ("decoder.nope", "no module at 'decoder.nope'"),
    ("decoder.stages.2", "no module at 'decoder.stages.2'"),
    ("decoder.stages.-3", "no module at 'decoder.stages.-3'"),
    ("decoder..stages", "no module"),
    ("decoder.stages.x", "no module"),
    ("decoder.deep_supervision", "not a module"),
    ("encoder.stages.0.0.convs.0.conv.weight", "not a module"),
])
def test_bad_paths_raise(path, match):
    with pytest.raises(CIMISError, match=match):
        resolve_module(_unet(), path)
    with pytest.raises(CIMISError):
        FeatureTaps(_unet(), {"f": path})


def test_double_minus_index_is_a_cimis_error():
    with pytest.raises(CIMISError):
        resolve_module(_unet(), "decoder.stages.--1")


# ---------------------------------------------------------------- hooks
def test_taps_capture_by_hand_values_and_tuple_outputs():
    toy = _Toy()
    taps = FeatureTaps(toy, {"a": "a", "mid": "blocks.0", "last": "blocks.-1"})
    x = torch.tensor([1.0, -2.0])
    out = toy(x)
    torch.testing.assert_close(taps.features["a"], torch.tensor([2.0, -4.0]))
    torch.testing.assert_close(taps.features["mid"], torch.tensor([4.0, -8.0]))
    torch.testing.assert_close(taps.features["last"], torch.tensor([5.0, -7.0]))  # first element of the tuple
    torch.testing.assert_close(out, torch.tensor([5.0, -7.0]))
    toy(torch.tensor([0.5, 0.0]))  # the last forward pass wins
    torch.testing.assert_close(taps.features["mid"], torch.tensor([2.0, 0.0]))


def test_taps_on_unet_have_the_stage_shapes():
    net = _unet()
    taps = FeatureTaps(net, {"proto": "decoder.stages.-2", "bottleneck": "encoder.stages.-1"})
    net(torch.randn(1, 1, 8, 8, 8))
    assert taps.features["proto"].shape == (1, 8, 4, 4, 4)
    assert taps.features["bottleneck"].shape == (1, 8, 2, 2, 2)


@pytest.mark.parametrize("detach", [False, True])
def test_detach(detach):
    net = _unet()
    taps = FeatureTaps(net, {"proto": "decoder.stages.-2"}, detach=detach)
    net(torch.randn(1, 1, 8, 8, 8))
    f = taps.features["proto"]
    assert f.requires_grad is (not detach)
    assert (f.grad_fn is None) is detach
    if not detach:  # gradients flow from the tapped features into the network
        f.sum().backward()
        assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None


def test_clear_keeps_hooks_and_remove_uninstalls_them():
    toy = _Toy()
    taps = FeatureTaps(toy, {"a": "a"})
    toy(torch.ones(1))
    taps.clear()
    assert taps.features == {}
    toy(torch.ones(1))
    torch.testing.assert_close(taps.features["a"], torch.tensor([2.0]))
    taps.remove()
    assert taps.features == {}
    toy(torch.ones(1))
    assert taps.features == {}
    assert len(toy.a._forward_hooks) == 0
    taps.remove()  # a second remove is harmless


# ---------------------------------------------------------------- wrappers
def test_unwrap_network():
    net = _unet()
    assert unwrap_network(net) is net
    assert unwrap_network(_CompiledLike(net)) is net
    assert unwrap_network(_ddp_like(net)) is net
    assert unwrap_network(_CompiledLike(_ddp_like(net))) is net  # DDP of a compiled model: compile(DDP(...))
    assert unwrap_network(_ddp_like(_CompiledLike(net))) is net


def test_paths_and_taps_through_wrappers():
    net = _unet()
    for wrapped in (_CompiledLike(net), _ddp_like(net), _CompiledLike(_ddp_like(net))):
        assert resolve_module(wrapped, "decoder.stages.-2") is net.decoder.stages[0]
    wrapped = _CompiledLike(net)
    taps = FeatureTaps(wrapped, {"proto": "decoder.stages.-2"}, detach=True)
    x = torch.randn(1, 1, 8, 8, 8)
    wrapped(x)
    through_wrapper = taps.features["proto"]
    taps.clear()
    net(x)
    torch.testing.assert_close(taps.features["proto"], through_wrapper)
    taps.remove()
    assert len(net.decoder.stages[0]._forward_hooks) == 0

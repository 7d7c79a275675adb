"""Tests of nnunetv2_cimis.teacher.head: widening the segmentation heads of a step's student (MiB init).

Expected values are computed here from the teacher's tensors (copy / ``b_bg - log(n_new + 1)``), never by
calling the code under test.
"""
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.teacher.head import widen_head_state, widen_student_from_teacher


def _unet(num_classes, dim=3, features=(4, 8), seed=0):
    """A tiny nnU-Net PlainConvUNet with deep supervision on and random (non-default) head weights."""
    torch.manual_seed(seed)
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    n = len(features)
    net = PlainConvUNet(1, n, list(features), conv, 3, [1] + [2] * (n - 1), 1, num_classes, 1, conv_bias=True,
                        norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    with torch.no_grad():  # make the head biases distinct and non-zero so the shifts are visible
        for layer in net.decoder.seg_layers:
            layer.bias.copy_(torch.randn_like(layer.bias))
    return net.eval()


def _heads(net):
    return list(net.decoder.seg_layers)


CASES = [  # (dim, features, n_old, n_new)
    (3, (4, 8), 3, 2),
    (2, (4, 8), 3, 2),
    (3, (4, 8, 8), 2, 3),  # three stages: two deep-supervision heads
    (2, (4, 8, 8), 4, 1),  # a step with a single new class
]


@pytest.mark.parametrize("dim,features,n_old,n_new", CASES)
def test_widened_heads_by_hand(dim, features, n_old, n_new):
    teacher = _unet(n_old, dim, features, seed=1)
    student = _unet(n_old + n_new, dim, features, seed=2)
    widen_student_from_teacher(student, teacher, n_old)
    assert len(_heads(student)) == len(features) - 1
    shift = math.log(n_new + 1)
    for t_head, s_head in zip(_heads(teacher), _heads(student)):
        tw, tb = t_head.weight.detach(), t_head.bias.detach()
        sw, sb = s_head.weight.detach(), s_head.bias.detach()
        assert sw.shape[0] == n_old + n_new and sb.shape == (n_old + n_new,)
        # old rows: weights copied exactly, biases copied for the old foreground classes
        assert torch.equal(sw[:n_old], tw)
        assert torch.equal(sb[1:n_old], tb[1:n_old])
        # new rows: background weights
        for j in range(n_old, n_old + n_new):
            assert torch.equal(sw[j], tw[0])
        # new biases and background bias: b_bg - log(n_new + 1)
        expected = float(tb[0]) - shift
        assert float(sb[0]) == pytest.approx(expected, abs=1e-6)
        for j in range(n_old, n_old + n_new):
            assert float(sb[j]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dim,features,n_old,n_new", CASES)
def test_non_head_weights_identical_to_teacher(dim, features, n_old, n_new):
    teacher = _unet(n_old, dim, features, seed=3)
    student = _unet(n_old + n_new, dim, features, seed=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    widen_student_from_teacher(student, teacher, n_old)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    n_checked = 0
    for key, value in s_state.items():
        if ".seg_layers." in key:
            continue
        assert torch.equal(value, t_state[key]), key
        if value.numel() > 1 and not torch.equal(before[key], t_state[key]):
            n_checked += 1
    assert n_checked > 0  # the student really was different before the copy


def _softmax_all_scales(net, x):
    with torch.no_grad():
        return [torch.softmax(o.double(), 1) for o in net(x)]


@pytest.mark.parametrize("dim,features,n_old,n_new", CASES)
def test_old_class_probabilities_unchanged_after_widening(dim, features, n_old, n_new):
    """MiB's property: p_old(c) is unchanged for old c, and p_bg(teacher) = p_bg + sum of p_new."""
    teacher = _unet(n_old, dim, features, seed=5)
    student = _unet(n_old + n_new, dim, features, seed=6)
    widen_student_from_teacher(student, teacher, n_old)
    torch.manual_seed(7)
    x = torch.randn((2, 1) + (8,) * dim)
    p_t_scales = _softmax_all_scales(teacher, x)
    p_s_scales = _softmax_all_scales(student, x)
    assert len(p_t_scales) == len(p_s_scales) == len(features) - 1
    for p_t, p_s in zip(p_t_scales, p_s_scales):
        assert p_s.shape[1] == n_old + n_new
        torch.testing.assert_close(p_s[:, 1:n_old], p_t[:, 1:n_old], atol=1e-5, rtol=0)
        torch.testing.assert_close(p_s[:, 0] + p_s[:, n_old:].sum(1), p_t[:, 0], atol=1e-5, rtol=0)
        # background and the new classes share the teacher's background probability equally
        for j in range(n_old, n_old + n_new):
            torch.testing.assert_close(p_s[:, j], p_t[:, 0] / (n_new + 1), atol=1e-5, rtol=0)


def test_widen_head_state_leaves_teacher_state_untouched():
    teacher = _unet(3, 3, (4, 8), seed=8)
    student = _unet(5, 3, (4, 8), seed=9)
    t_state = teacher.state_dict()
    snapshot = {k: v.clone() for k, v in t_state.items()}
    out = widen_head_state(t_state, student.state_dict(), 3)
    for k in snapshot:
        assert torch.equal(t_state[k], snapshot[k])
    out["encoder.stages.0.0.convs.0.conv.weight"].add_(1.0)  # the result does not alias the teacher
    assert torch.equal(t_state["encoder.stages.0.0.convs.0.conv.weight"],
                       snapshot["encoder.stages.0.0.convs.0.conv.weight"])


def test_no_new_class_is_a_plain_copy():
    teacher = _unet(3, 2, (4, 8), seed=10)
    student = _unet(3, 2, (4, 8), seed=11)
    widen_student_from_teacher(student, teacher, 3)
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


def test_teacher_with_other_number_of_outputs_than_n_old():
    teacher = _unet(4, 3, (4, 8), seed=12)  # the teacher knows 4 labels
    student = _unet(6, 3, (4, 8), seed=13)
    with pytest.raises(CIMISError, match="has 4 outputs"):
        widen_student_from_teacher(student, teacher, 3)  # but the step metadata says 3


def test_teacher_of_other_features_is_an_architecture_mismatch():
    teacher = _unet(3, 3, (4, 16), seed=14)
    student = _unet(5, 3, (4, 8), seed=15)
    with pytest.raises(CIMISError, match="different plans"):
        widen_student_from_teacher(student, teacher, 3)


def test_teacher_with_other_number_of_stages_is_an_architecture_mismatch():
    teacher = _unet(3, 3, (4, 8, 8), seed=16)
    student = _unet(5, 3, (4, 8), seed=17)
    with pytest.raises(CIMISError, match="architecture differs"):
        widen_student_from_teacher(student, teacher, 3)


def test_teacher_of_other_dimension_is_an_architecture_mismatch():
    teacher = _unet(3, 2, (4, 8), seed=18)
    student = _unet(5, 3, (4, 8), seed=19)
    with pytest.raises(CIMISError):
        widen_student_from_teacher(student, teacher, 3)


def test_student_with_fewer_outputs_than_teacher():
    teacher = _unet(4, 3, (4, 8), seed=20)
    student = _unet(3, 3, (4, 8), seed=21)
    with pytest.raises(CIMISError, match="Cannot widen"):
        widen_student_from_teacher(student, teacher, 4)


@pytest.mark.parametrize("dim,features,n_old,n_new", CASES)
def test_random_init_keeps_the_students_fresh_rows(dim, features, n_old, n_new):
    """init="random" (MiB's code for FT, LwF, ILT): old rows copied, new rows and background untouched."""
    teacher = _unet(n_old, dim, features, seed=1)
    student = _unet(n_old + n_new, dim, features, seed=2)
    fresh = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in _heads(student)]
    widen_student_from_teacher(student, teacher, n_old, init="random")
    for t_head, s_head, (w0, b0) in zip(_heads(teacher), _heads(student), fresh):
        torch.testing.assert_close(s_head.weight[:n_old], t_head.weight)
        torch.testing.assert_close(s_head.bias[:n_old], t_head.bias)  # background bias not shifted
        torch.testing.assert_close(s_head.weight[n_old:], w0[n_old:])
        torch.testing.assert_close(s_head.bias[n_old:], b0[n_old:])


def test_unknown_head_init_is_refused():
    with pytest.raises(CIMISError, match="head initialisation"):
        widen_student_from_teacher(_unet(3), _unet(3), 3, init="zeros")


def test_trainers_head_init_follows_mibs_code():
    from nnunetv2_cimis.training.registry import package_trainers
    inits = {name: getattr(cls, "head_init", None) for name, cls in package_trainers().items()}
    assert inits["nnUNetTrainerFT"] == inits["nnUNetTrainerLwF"] == inits["nnUNetTrainerILT"] == "random"
    for name in ("nnUNetTrainerMiB", "nnUNetTrainerPLOP", "nnUNetTrainerPGCD", "nnUNetTrainerDAPD",
                 "nnUNetTrainerPGCDDAPD", "nnUNetTrainerMOSInv", "nnUNetTrainerDDCL"):
        assert inits[name] == "mib", name

"""Label-value checks without host synchronisation (issue 13, point 5).

Reading a tensor's value on the host (``int(t)``, ``bool(t)``, ``t.item()``) waits for the device. Tensors on
PyTorch's ``meta`` device have shapes but no values, so any such read raises there: a loss whose ``forward``
runs on meta tensors reads nothing back, the way it runs on a GPU. The losses check label values only on CPU
tensors or with ``nnUNet_cimis_debug_checks=1``; the trainer checks each batch once on the host.
"""
import pytest
import torch

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.losses.common import ENV_DEBUG_CHECKS, check_batch_labels, check_label_range
from nnunetv2_cimis.losses.dice import soft_dice_loss
from nnunetv2_cimis.losses.iapl import IAPLLoss
from nnunetv2_cimis.losses.mib import UnbiasedCrossEntropy, UnbiasedDiceCELoss, UnbiasedKnowledgeDistillation
from nnunetv2_cimis.losses.plop import PseudoLabelDiceCELoss

META = torch.device("meta")


def _meta_inputs(channels=4, ignore=None):
    logits = torch.empty(2, channels, 6, 6, 6, device=META)
    target = torch.empty(2, 1, 6, 6, 6, device=META)
    return logits, target


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_mib_losses_read_nothing_back_on_a_device(ignore_index, monkeypatch):
    monkeypatch.delenv(ENV_DEBUG_CHECKS, raising=False)
    logits, target = _meta_inputs()
    assert UnbiasedCrossEntropy(2, ignore_index=ignore_index)(logits, target).shape == ()
    assert UnbiasedDiceCELoss(2, batch_dice=True, ignore_index=ignore_index)(logits, target).shape == ()
    assert UnbiasedKnowledgeDistillation(2)(logits, torch.empty(2, 2, 6, 6, 6, device=META)).shape == ()


def test_other_losses_read_nothing_back_on_a_device(monkeypatch):
    monkeypatch.delenv(ENV_DEBUG_CHECKS, raising=False)
    logits, target = _meta_inputs(3)
    assert PseudoLabelDiceCELoss()(logits, target.long()[:, 0], torch.empty(2, device=META)).shape == ()
    aux = [torch.empty(2, 3, 3, 3, 3, device=META)]
    assert IAPLLoss(3)(logits, target, aux).shape == ()
    assert soft_dice_loss(logits.softmax(1), target[:, 0].long(), batch_dice=True,
                          present_classes_only=True).shape == ()


def test_debug_flag_checks_on_every_device(monkeypatch):
    """With nnUNet_cimis_debug_checks=1 the check runs off the CPU too (on meta it then has to read values)."""
    monkeypatch.setenv(ENV_DEBUG_CHECKS, "1")
    logits, target = _meta_inputs()
    with pytest.raises(RuntimeError, match="meta"):
        UnbiasedCrossEntropy(2)(logits, target)


def test_cpu_checks_and_the_all_ignored_unce(monkeypatch):
    monkeypatch.delenv(ENV_DEBUG_CHECKS, raising=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) \(0 .. 2\) or the ignore index 9"):
        check_label_range(torch.tensor([0, 1, 3, 9]), 3, 9)
    check_label_range(torch.tensor([0, 2, 9]), 3, 9)
    check_label_range(torch.tensor([0, 7]), 3, mask=torch.tensor([True, False]))  # masked-out voxels not read
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    loss = UnbiasedCrossEntropy(2, ignore_index=255)(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    target[0, 0, 0] = 2  # one valid voxel: the mean over the valid voxels only
    nll = -torch.log_softmax(logits, 1)[0, 2, 0, 0]
    assert UnbiasedCrossEntropy(2, ignore_index=255)(logits, target).item() == pytest.approx(nll.item(), rel=1e-6)


def test_trainer_batch_check_is_a_user_error(monkeypatch):
    monkeypatch.delenv(ENV_DEBUG_CHECKS, raising=False)
    good = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]
    good[0][0, 0, 0, 0] = 3
    check_batch_labels(good, 4)
    check_batch_labels(torch.full((1, 1, 2, 2), 7.0), 4, ignore_index=7)
    with pytest.raises(CIMISError, match=r"label values in \[5, 5\].*4 outputs.*dataset.json"):
        check_batch_labels([torch.full((1, 1, 2, 2), 5.0)], 4)
    check_batch_labels(torch.empty(1, 1, 2, 2, device=META), 4)  # off the host: not read (no synchronisation)

"""Tests of nnunetv2_cimis.losses.contrastive (cross-image pixel contrast, memory queues, pseudo-labels)."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_cimis.losses.contrastive import (ClassMemoryQueue, CrossImagePixelContrastLoss, ProjectionHead,
                                               labels_for_contrast, sample_pixels_per_class)


def _reference_loss(emb, lab, contrast_emb, contrast_lab, tau, n_anchor):
    """Eq. 2 of Wang et al. (ICCV 2021), written out with explicit loops in numpy."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    contrast_emb = contrast_emb / np.linalg.norm(contrast_emb, axis=1, keepdims=True)
    losses = []
    for i in range(n_anchor):
        pos = [j for j in range(len(contrast_lab)) if contrast_lab[j] == lab[i] and j != i]
        neg = [j for j in range(len(contrast_lab)) if contrast_lab[j] != lab[i]]
        if not pos:
            continue
        s_neg = sum(math.exp(emb[i] @ contrast_emb[j] / tau) for j in neg)
        terms = []
        for p in pos:
            e = math.exp(emb[i] @ contrast_emb[p] / tau)
            terms.append(-math.log(e / (e + s_neg)))
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def _as_image(vectors):
    """(N, D) -> (1, D, 1, N) embeddings."""
    return torch.tensor(np.asarray(vectors, dtype=np.float64).T[None, :, None, :])


def test_loss_matches_hand_computation_without_queue():
    vecs = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]
    labs = [0, 0, 1, 1]
    loss = CrossImagePixelContrastLoss(temperature=0.5)(_as_image(vecs), torch.tensor([[labs]]))
    # hand computation of anchor 0: s(0,1) = 0.8/0.5, negatives s(0,2) = 0, s(0,3) = -1.2
    # L_0 = -log(e^1.6 / (e^1.6 + e^0 + e^-1.2))
    l0 = -math.log(math.exp(1.6) / (math.exp(1.6) + 1 + math.exp(-1.2)))
    expected = _reference_loss(np.array(vecs), labs, np.array(vecs), labs, 0.5, 4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # anchor 0 and anchor 1 share the same structure: check one term by hand against the reference
    l1 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.6 / 0.5) + math.exp(0.0 / 0.5)))
    l2 = -math.log(math.exp(1.6) / (math.exp(1.6) + 1 + math.exp(1.2)))
    l3 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(-1.2) + 1))
    assert loss.item() == pytest.approx((l0 + l1 + l2 + l3) / 4, rel=1e-6)


def test_loss_uses_queue_entries_as_contrast():
    vecs = [[1.0, 0.0], [0.0, 1.0]]
    labs = [0, 1]
    queue = ClassMemoryQueue(num_classes=2, dim=2, size=4)
    queue.push(torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], dtype=torch.float64).float(),
               torch.tensor([0, 1, 1]))
    loss = CrossImagePixelContrastLoss(temperature=0.07)(_as_image(vecs).float(), torch.tensor([[labs]]),
                                                         queue=queue)
    # queue.get() lists class 0 first, then class 1, in insertion order
    contrast = np.array(vecs + [[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    contrast_lab = labs + [0, 1, 1]
    expected = _reference_loss(np.array(vecs), labs, contrast, contrast_lab, 0.07, 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_normalises_embeddings_and_ignores_pixels():
    vecs = [[2.0, 0.0], [1.6, 1.2], [0.0, 3.0], [5.0, 5.0]]
    labs = [0, 0, 1, -1]
    loss = CrossImagePixelContrastLoss(temperature=0.5)(_as_image(vecs), torch.tensor([[labs]]))
    expected = _reference_loss(np.array(vecs[:3]), labs[:3], np.array(vecs[:3]), labs[:3], 0.5, 3)
    # anchor 2 (class 1) has no positive and is left out of the mean
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    ignore = CrossImagePixelContrastLoss(temperature=0.5, ignore_index=1)(_as_image(vecs), torch.tensor([[labs]]))
    # only class 0 left: no negatives, -log(e^s / e^s) = 0
    assert ignore.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_without_positives_is_zero_and_differentiable():
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [2, 3]]])
    loss = CrossImagePixelContrastLoss()(emb, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


def test_loss_gradient_pulls_positives_together():
    emb = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]], requires_grad=True)  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    loss = CrossImagePixelContrastLoss(temperature=0.1)(emb, labels)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_loss_3d_input_and_label_channel():
    torch.manual_seed(0)
    emb = torch.randn(2, 8, 3, 3, 3)
    labels = torch.randint(0, 3, (2, 1, 3, 3, 3)).float()
    value = CrossImagePixelContrastLoss(max_anchors_per_class=1000)(emb, labels)
    flat = torch.nn.functional.normalize(emb, dim=1).movedim(1, -1).reshape(-1, 8).numpy()
    lab = labels[:, 0].reshape(-1).long().numpy()
    # the loss samples anchors grouped by class: compare in that order
    order = np.concatenate([np.nonzero(lab == k)[0] for k in range(3)])
    expected = _reference_loss(flat[order], lab[order], flat[order], lab[order], 0.07, len(order))
    assert value.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0), dict(max_anchors_per_class=0),
                                    dict(queue_pixels_per_image=0)])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        CrossImagePixelContrastLoss(**kwargs)


def test_bad_shapes_raise():
    loss = CrossImagePixelContrastLoss()
    with pytest.raises(ValueError, match="shape"):
        loss(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(1, 4, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 3-d"):
        loss(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), queue=ClassMemoryQueue(2, 3, 4))


def test_hard_easy_anchor_sampling():
    labels = torch.tensor([0] * 10 + [1] * 3)
    hard = torch.zeros(13, dtype=torch.bool)
    hard[[0, 1, 2]] = True
    g = torch.Generator().manual_seed(0)
    idx = sample_pixels_per_class(labels, 4, hard, g)
    chosen0 = [i for i in idx.tolist() if labels[i] == 0]
    assert len(chosen0) == 4 and sum(1 for i in chosen0 if hard[i]) == 2
    assert sorted(i for i in idx.tolist() if labels[i] == 1) == [10, 11, 12]  # fewer than the quota: all
    # one hard pixel only: the easy ones fill the quota
    hard[:] = False
    hard[5] = True
    idx = sample_pixels_per_class(labels, 4, hard, g).tolist()
    assert 5 in idx and sum(1 for i in idx if labels[i] == 0) == 4


def test_queue_fifo_and_state_dict():
    q = ClassMemoryQueue(num_classes=3, dim=2, size=3)
    q.push(torch.tensor([[1.0, 0], [2, 0]]), torch.tensor([1, 1]))
    q.push(torch.tensor([[3.0, 0], [4, 0], [9, 9]]), torch.tensor([1, 1, 2]))
    # class 1 received 1, 2, 3, 4 with capacity 3: 1 was overwritten by 4 at slot 0
    assert q.queue[1, :, 0].tolist() == [4.0, 2.0, 3.0]
    assert q.count.tolist() == [0, 3, 1] and q.ptr.tolist() == [0, 1, 1]
    emb, lab = q.get()
    assert lab.tolist() == [1, 1, 1, 2] and emb[-1].tolist() == [9.0, 9.0]
    q2 = ClassMemoryQueue(num_classes=3, dim=2, size=3)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.queue, q.queue) and torch.equal(q2.ptr, q.ptr) and torch.equal(q2.count, q.count)
    # more than the capacity at once: the last `size` are kept
    q.push(torch.arange(10.0)[:, None].repeat(1, 2), torch.zeros(10, dtype=torch.long))
    assert sorted(q.queue[0, :, 0].tolist()) == [7.0, 8.0, 9.0]


def test_queue_bad_input_raises():
    q = ClassMemoryQueue(2, 2, 4)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        q.push(torch.zeros(1, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match="\\(M, 2\\)"):
        q.push(torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError):
        ClassMemoryQueue(0, 2, 4)


def test_update_queue_pushes_per_image_and_class():
    loss = CrossImagePixelContrastLoss(queue_pixels_per_image=2)
    q = ClassMemoryQueue(num_classes=3, dim=2, size=10)
    emb = torch.randn(2, 2, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0, :3] = 1
    labels[1, 0, 0] = 1
    labels[1, 3, 3] = -1
    labels[1, 2, 2] = 7  # beyond the queue's classes: skipped
    loss.update_queue(q, emb, labels)
    assert q.count.tolist() == [4, 3, 0]
    assert torch.allclose(q.queue[1, :3].norm(dim=1), torch.ones(3))


def test_projection_head_output_is_normalised_and_checks_input():
    head = ProjectionHead(in_channels=4, embedding_dim=3, spatial_dims=2)
    out = head(torch.randn(2, 4, 5, 5))
    assert out.shape == (2, 3, 5, 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 5, 5), atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        head(torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError):
        ProjectionHead(4, spatial_dims=1)


def test_labels_for_contrast_pseudo_labels():
    labels = torch.tensor([[[0, 0, 0, 3]]])  # (1, 1, 4); 3 is a new class
    # teacher over (bg, old 1, old 2): pixel 0 -> bg, pixel 1 -> old 1 sure, pixel 2 -> old 2 unsure
    teacher = torch.log(torch.tensor([[[0.9, 0.05, 0.3, 0.9],
                                       [0.05, 0.9, 0.3, 0.05],
                                       [0.05, 0.05, 0.4, 0.05]]]))[:, :, None]  # (1, 3, 1, 4)
    out = labels_for_contrast(labels, teacher, confidence=0.5)
    assert out.tolist() == [[[0, 1, -1, 3]]]
    out = labels_for_contrast(labels, teacher, confidence=0.0, background_known=False)
    assert out.tolist() == [[[-1, 1, 2, 3]]]
    out = labels_for_contrast(labels.repeat(2, 1, 1), teacher.repeat(2, 1, 1, 1),
                              background_known=torch.tensor([True, False]))
    assert out[:, 0, 0].tolist() == [0, -1]
    with pytest.raises(ValueError, match="background_known"):
        labels_for_contrast(labels, teacher, background_known=torch.tensor([True, False]))

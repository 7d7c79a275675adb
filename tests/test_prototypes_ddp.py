"""Prototype statistics under DDP: two CPU processes (gloo) must see the prototypes, DAPD loss and (after
DDP's gradient averaging) gradients of the whole batch, as one process holding all of it does."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_cimis.losses.dapd import DualAlignedPrototypeDistillation
from nnunetv2_cimis.losses.prototypes import IGNORE_REGION, all_reduce_prototype_sums, class_masks, local_prototypes

WORLD_SIZE = 2


def _batch():
    """A batch of 2 images, one per rank. Class 2 occurs only in image 1; class 3 nowhere."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 4, generator=g)
    teacher = torch.randn(2, 3, 4, 4, generator=g)
    regions = torch.full((2, 4, 4), IGNORE_REGION)
    regions[0, :2] = 0
    regions[0, 2:, :2] = 1
    regions[1, :1] = 1
    regions[1, 1:3] = 0
    regions[1, 3, :] = 2
    globals_ = torch.randn(4, 3, generator=g)
    return student, teacher, regions, globals_


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        student, teacher, regions, globals_ = _batch()
        s = student[rank:rank + 1].clone().requires_grad_()
        t = teacher[rank:rank + 1]
        r = regions[rank:rank + 1]
        protos, counts = local_prototypes(s, class_masks(r, [0, 1, 2, 3]))
        loss = DualAlignedPrototypeDistillation()(s, t, r, globals_)
        loss.backward()
        # a no-grad reduction and the no-op structure of the result
        sums, c = all_reduce_prototype_sums(torch.ones(2, 3), torch.tensor([1.0, 0.0]))
        torch.save({"protos": protos.detach(), "counts": counts, "loss": loss.detach(), "grad": s.grad,
                    "sums": sums, "c": c}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear the group down only when every rank has finished every collective: without this barrier a
        # rank that is done first destroys its gloo pairs while the other still completes its last all_reduce,
        # and gloo's transport thread aborts the process ("terminate called without an active exception",
        # SIGABRT in mp.spawn; measured 1-3 aborts in 20-40 runs without it, none in 80 with it).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_prototypes_like_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    student, teacher, regions, globals_ = _batch()
    full = student.clone().requires_grad_()
    ref_protos, ref_counts = local_prototypes(full, class_masks(regions, [0, 1, 2, 3]))
    ref_loss = DualAlignedPrototypeDistillation()(full, teacher, regions, globals_)
    ref_loss.backward()
    assert ref_counts.tolist() == [16.0, 8.0, 4.0, 0.0]

    for rank, res in enumerate(results):
        torch.testing.assert_close(res["protos"], ref_protos.detach())
        torch.testing.assert_close(res["counts"], ref_counts)
        torch.testing.assert_close(res["loss"], ref_loss.detach())
        torch.testing.assert_close(res["sums"], torch.full((2, 3), 2.0))
        torch.testing.assert_close(res["c"], torch.tensor([2.0, 0.0]))
        # DDP averages parameter gradients over ranks; the features' gradient on a rank, divided by the world
        # size, must therefore be the full-batch gradient of that rank's part
        torch.testing.assert_close(res["grad"] / WORLD_SIZE, full.grad[rank:rank + 1])
    assert torch.isfinite(results[0]["protos"]).all()

"""Cost of MOSInversion synthesis: seconds per synthetic volume per 100 inversion iterations.

Builds nnU-Net's PlainConvUNet (InstanceNorm, deep supervision on, as a teacher in training) with the given
features per stage, takes the statistics of its normalisation inputs on random "real" patches as the step
memory, and times :func:`nnunetv2_cimis.synthesis.inversion.invert` for each batch size. Example (the numbers
in docs/methods_mosinversion.md)::

    OMP_NUM_THREADS=2 python benchmarks/synthesis_cost.py --patch 32 32 32 --batch 1 2 4 --iterations 20

A command, not a test: it prints one line per batch size.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def build_network(features, patch, num_classes: int = 3, device="cpu") -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    nd = len(patch)
    conv = nn.Conv3d if nd == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d
    n = len(features)
    net = PlainConvUNet(1, n, list(features), conv, 3, [1] + [2] * (n - 1), 2, num_classes, 2, conv_bias=True,
                        norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return net.to(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, nargs="+", default=[32, 32, 32])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per batch size (default 20)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    from nnunetv2_cimis.networks.norm_statistics import NormInputRecorder, pool_statistics
    from nnunetv2_cimis.synthesis.inversion import InversionConfig, invert

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build_network(args.features, args.patch, device=device)
    net.eval()
    with NormInputRecorder(net) as rec, torch.no_grad():
        net(torch.randn(2, 1, *args.patch, device=device) * 0.5 + 1)
        stats = {n: dict(zip(("mean", "var"), pool_statistics(*rec.stats[n]))) for n in rec.names}
    n_params = sum(q.numel() for q in net.parameters())
    print(f"network: PlainConvUNet features {args.features}, {n_params / 1e6:.2f}M parameters, "
          f"{len(stats)} normalisation layers; patch {args.patch}; device {device}; "
          f"threads {torch.get_num_threads()}")
    for b in args.batch:
        masks = torch.zeros((b, *args.patch), dtype=torch.long, device=device)
        sl = tuple(slice(s // 4, s // 2) for s in args.patch)
        masks[(slice(None),) + sl] = 1
        invert(net, masks, stats, 1, InversionConfig(iterations=2))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        invert(net, masks, stats, 1, InversionConfig(iterations=args.iterations))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        per_volume_100 = dt / b * 100 / args.iterations
        # reference: the bare forward + backward to the input, without the inversion's losses
        x = torch.randn((b, 1, *args.patch), device=device, requires_grad=True)
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            torch.autograd.grad(net(x)[0].sum(), x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare = (time.perf_counter() - t0) / args.iterations
        print(f"batch {b}: {dt / args.iterations:.3f} s per iteration (bare forward+backward {bare:.3f} s), "
              f"{per_volume_100:.1f} s per volume per 100 iterations "
              f"({per_volume_100 * 20 / 60:.1f} min per volume at 2000 iterations)")


if __name__ == "__main__":
    main()

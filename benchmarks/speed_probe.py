"""How fast is this machine right now? A fixed one-thread convolution workload, to put demo times in context.

A shared virtual machine's speed varies from hour to hour: on the 2-core build machine the same demo run took
9 min 7 s in one hour and 11 min 35 s in another, with epochs 1.4-1.5 times longer and a steal time of 15-35 %
of a core (docs/benchmarks.md, "2D demo time"). Run this before and after a timed run and report its figure with
the time. The workload: 30 forward and backward passes of six 3 x 3 x 3 convolutions with 16 channels and leaky
ReLUs on a batch of 2 x 24^3 (the 3D demo's patch) in one thread, after 3 warm-up passes; ``--repeats`` runs it
several times and prints each time and the best.

Measured on the 2-core build machine (CPU): 2.4-2.9 s around the demo runs recorded in docs/benchmarks.md, up to
3.4 s just after the slow run.

Example::

    python benchmarks/speed_probe.py --repeats 3
"""
from __future__ import annotations

import argparse
import time

import torch


def probe(passes: int = 30, warmup: int = 3) -> float:
    """Seconds for ``passes`` forward and backward passes of the fixed network, one thread."""
    if passes < 1 or warmup < 0:
        raise ValueError(f"passes must be >= 1 and warmup >= 0, got {passes}, {warmup}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        layers = []
        for i in range(6):
            layers += [torch.nn.Conv3d(16 if i else 1, 16, 3, padding=1), torch.nn.LeakyReLU()]
        net = torch.nn.Sequential(*layers)
        x = torch.randn(2, 1, 24, 24, 24)
        for _ in range(warmup):
            net(x).sum().backward()
        start = time.perf_counter()
        for _ in range(passes):
            net(x).sum().backward()
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="how many times to run the probe")
    p.add_argument("--passes", type=int, default=30, help="timed forward and backward passes per run")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    times = [probe(a.passes) for _ in range(a.repeats)]
    for t in times:
        print(f"speed probe: {t:.2f} s", flush=True)
    if len(times) > 1:
        print(f"best: {min(times):.2f} s")


if __name__ == "__main__":
    main()

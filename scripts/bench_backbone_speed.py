#!/usr/bin/env python
"""Feature-extraction speed of the frozen backbones Fusion can use, on one CPU thread.

    OMP_NUM_THREADS=1 python scripts/bench_backbone_speed.py [--size 256] [--rounds 5]

Each round times every backbone once on the same 32 images (levels at strides 8 and 16,
Fusion's), interleaved so that a change of machine load hits them all alike; the median
round is reported. This is the part of Fusion's training and scoring that the backbone
changes (the memory search and the head see a few more channels).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from osad_core.backbones import build_multiscale, efficientnet_lite_weights_file  # noqa: E402

ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.images, 3, a.size, a.size)
    nets = {arch: build_multiscale(arch, layers=(2, 3))[0] for arch in ARCHS if efficientnet_lite_weights_file(arch)}
    times = {arch: [] for arch in nets}
    with torch.no_grad():
        for arch, net in nets.items():  # warm-up
            net(x[:4])
        for _ in range(a.rounds):
            for arch, net in nets.items():
                t0 = time.perf_counter()
                for i in range(0, len(x), 16):
                    net(x[i:i + 16])
                times[arch].append(time.perf_counter() - t0)
    print(f"{a.images} images at {a.size} px, batches of 16, {torch.get_num_threads()} thread(s), "
          f"median of {a.rounds} interleaved rounds")
    base = statistics.median(times[ARCHS[0]]) if ARCHS[0] in times else None
    for arch, t in times.items():
        med = statistics.median(t)
        rel = f"  (time {med / base:.2f}× Lite0's)" if base else ""
        print(f"{arch:20s} {a.images / med:7.1f} images/s{rel}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Serial against Ray on this machine: a benchmark sweep and bulk scoring.

    .venv/bin/python scripts/bench_cluster.py [--seeds 4] [--images 5000]

1. A sweep of (2 methods x N seeds) small cells, once serially (``benchmark``) and once on
   a local Ray cluster with one worker per CPU core (``benchmark --ray local``); both with one
   thread per cell; prints the wall times, the speed-up and whether the AUROCs agree.
2. ``--images`` synthetic 64-pixel images (written to a temporary folder, removed at the
   end) scored with one tiny model by ``score`` (one process) and ``score --ray local``;
   prints images/s of both, start-up included.

Both sides of each comparison run in the same invocation, one after the other, so a
machine shared with other work affects both alike (run it twice to see the spread). Ray
runs its workers at niceness 15 by default; here they run at 0 (``RAY_worker_niceness``),
as the serial side does, so that other work on a shared machine does not favour one side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def texture(rng, size: int, defect: str | None = None) -> Image.Image:
    img = np.repeat(rng.normal(120, 12, (size, size, 1)).clip(0, 255), 3, axis=2).astype(np.uint8)
    if defect:
        y, x = rng.integers(4, size - 20, 2)
        img[y:y + 16, x:x + 16] = 250 if defect == "scratch" else 10
    return Image.fromarray(img)


def mvtec(root: Path, size: int = 64, seed: int = 0) -> Path:
    """A small MVTec-layout folder: 24 normal training images, 8 good and 2x6 defective test images."""
    rng = np.random.default_rng(seed)
    for sub, n, defect in (("train/good", 24, None), ("test/good", 8, None), ("test/scratch", 6, "scratch"),
                           ("test/hole", 6, "hole")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            texture(rng, size, defect).save(root / sub / f"{i:04d}.png")
    return root


def cli(*args: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "osad_core", *args], cwd=REPO, env=env, text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"`{' '.join(args)}` failed:\n{p.stderr[-2000:]}")
    return dt, p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="seeds per method (cells = 2 x seeds)")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per cell: longer cells amortise Ray's start-up")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", OSAD_OFFLINE="1",
               OSAD_RAY_CPUS_PER_TASK="1", RAY_worker_niceness="0")
    workers = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="osad-bench-cluster-") as tmp:
        tmp = Path(tmp)
        env["OSAD_DATA_DIR"] = str(tmp / "data")
        data = mvtec(tmp / "parts")
        seeds = [str(s) for s in range(a.seeds)]
        common = ["benchmark", "--data", str(data), "--methods", "devnet,dra", "--seeds", *seeds, "--shots", "2",
                  "--preset", "tiny", "--weights", "random", "--backbone", "resnet18", "--image-size", "64",
                  "--epochs", str(a.epochs), "--steps-per-epoch", "4", "--device", "cpu", "--no-db"]
        print(f"sweep: 2 methods x {a.seeds} seeds = {2 * a.seeds} cells (tiny preset, 64 px, {a.epochs}x4 steps, CPU, 1 thread)")
        t_serial, _ = cli(*common, "--json", str(tmp / "serial.json"), env=env)
        t_ray, _ = cli(*common, "--json", str(tmp / "ray.json"), "--ray", "local", env=env)
        serial, on_ray = (json.loads((tmp / f"{n}.json").read_text()) for n in ("serial", "ray"))
        same = all(np.allclose(x["aurocs"], y["aurocs"], atol=1e-6) for x, y in zip(serial["rows"], on_ray["rows"]))
        print(f"  serial            {t_serial:7.1f} s")
        print(f"  Ray, {workers} workers    {t_ray:7.1f} s  (Ray start-up included)")
        print(f"  speed-up          {t_serial / t_ray:7.2f}x   AUROCs identical: {same}")

        model = tmp / "model.osad"
        cli("train", "--data", str(data), "--method", "devnet", "--preset", "tiny", "--shots", "2", "--weights",
            "random", "--backbone", "resnet18", "--image-size", "64", "--epochs", "1", "--device", "cpu", "--no-db",
            "--out", str(model), env=env)
        folder = tmp / "incoming"
        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(a.images):
            texture(rng, 64, "hole" if i % 50 == 0 else None).save(folder / f"{i:05d}.png")
        print(f"score: {a.images} images of 64x64 px with a tiny DevNet model (start-up included)")
        t_one, _ = cli("score", "--model", str(model), str(folder), "--csv", str(tmp / "one.csv"), "--device", "cpu",
                       env=env)
        t_many, err = cli("score", "--model", str(model), str(folder), "--csv", str(tmp / "ray.csv"), "--device",
                          "cpu", "--ray", "local", env=env)
        inner = re.search(r"scored \d+(?:/\d+)? images in [\d.]+ s: ([\d.]+) images/s", err)
        print(f"  one process       {t_one:7.1f} s  {a.images / t_one:7.1f} images/s")
        print(f"  Ray, {workers} workers    {t_many:7.1f} s  {a.images / t_many:7.1f} images/s"
              + (f"  ({inner.group(1)} images/s once Ray runs)" if inner else ""))
        rows_one = (tmp / "one.csv").read_text().splitlines()
        rows_ray = (tmp / "ray.csv").read_text().splitlines()
        print(f"  same paths in the same order: {[r.split(',')[0] for r in rows_one] == [r.split(',')[0] for r in rows_ray]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a large set of images with a saved model on an executor (``score --ray``).

Batches of paths go out as tasks; the model file travels once through the executor (a
Ray worker loads it once per process), so only the images need shared storage. Results
come back in the inputs' order and are streamed to the CSV as they arrive.
"""
from __future__ import annotations

import csv
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

_DETECTORS: dict = {}  # (sha256 of the model file, device) -> detector, per worker process


def _detector(model_bytes: bytes, device: str):
    from .methods.base import load_detector

    key = (hashlib.sha256(model_bytes).hexdigest(), device)
    if key not in _DETECTORS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.osad"
            path.write_bytes(model_bytes)
            _DETECTORS[key] = load_detector(path, device)
    return _DETECTORS[key]


def score_batch(model_bytes: bytes, device: str, paths: list[str]) -> tuple[list[str], list[float], list]:
    """One task: (scored paths, their scores, [(path, why) for unreadable files])."""
    pred = _detector(model_bytes, device).predict(paths)
    return [r.path for r in pred.records], [float(x) for x in pred.scores], list(pred.skipped)


class _ProgressLine:
    def __init__(self, total: int, out=sys.stderr):
        self.total, self.out, self.t0, self.last = total, out, time.monotonic(), 0.0
        self.tty = out.isatty()

    def show(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        width = 30
        bar = "#" * int(width * done / max(self.total, 1))
        rate = done / max(now - self.t0, 1e-9)
        line = f"[{bar:<{width}}] {done}/{self.total} images  {rate:.0f} images/s"
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()


def score_paths(executor, model: str | Path, paths: list[str], csv_path: str | None = None,
                threshold: float | None = None, device: str | None = None, batch: int = 256,
                echo: bool = True) -> dict:
    """Score ``paths`` with the model file ``model``; returns {"scored", "skipped", "seconds", "images_per_s"}."""
    from .methods.base import load_detector

    load_detector(model, "cpu")  # a refused or broken model file fails here, before any task starts
    model_bytes = Path(model).read_bytes()
    device = device or "auto"
    gpu = device.startswith("cuda")
    if device == "auto" and executor.name == "ray":
        from .executors.ray import cluster_has_gpu

        gpu = cluster_has_gpu()
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    progress = _ProgressLine(len(paths))
    t0 = time.monotonic()
    done = scored = 0
    skipped: list = []
    f = open(csv_path, "w", newline="") if csv_path else open(os.devnull, "w")
    with f:
        writer = csv.writer(f)
        writer.writerow(["path", "score"] + (["verdict"] if threshold is not None else []))
        for ok, scores, bad in executor.map(score_batch, batches, gpu=gpu, shared=(model_bytes, device)):
            for path, s in zip(ok, scores):
                row = [path, s] + (["anomaly" if s >= threshold else "normal"] if threshold is not None else [])
                writer.writerow(row)
                if echo:
                    print("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
            scored += len(ok)
            skipped += bad
            done += len(ok) + len(bad)
            progress.show(done)
    seconds = time.monotonic() - t0
    progress.show(done, force=True)
    if progress.tty:
        sys.stderr.write("\n")
    for _, why in skipped:
        print(f"skipped: {why}", file=sys.stderr)
    rate = scored / max(seconds, 1e-9)
    print(f"scored {scored} images in {seconds:.1f} s: {rate:.1f} images/s ({executor.name} executor)"
          + (f"; wrote {csv_path}" if csv_path else ""), file=sys.stderr)
    return {"scored": scored, "skipped": len(skipped), "seconds": seconds, "images_per_s": rate}

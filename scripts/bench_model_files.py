#!/usr/bin/env python
"""File size and save / load time of one model in the old pickled .pt form and as .osad.

    OMP_NUM_THREADS=2 python scripts/bench_model_files.py [--data headct] [--method dra] [--repeats 5]

Trains the method's quick preset on the data (10 shots, seed 0) for one step only: the
saved tensors have exactly the shapes of a fully trained quick model, which is all that
size and timing depend on. "load" is ``load_detector`` (read, check, rebuild the model);
"read" is the file alone: ``torch.load(weights_only=True)`` for .pt (the only way OSAD
Studio still reads one) and ``modelfile.read_model`` for .osad.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from osad_core.data import resolve_dataset
from osad_core.experiment import run_experiment
from osad_core.methods import load_detector
from osad_core.modelfile import _legacy_allowed_globals, read_model
from osad_core.protocol import Protocol


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="headct")
    ap.add_argument("--method", default="dra")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    res = run_experiment(resolve_dataset(a.data), Protocol("general", 10, seed=0), a.method, "quick",
                         {"epochs": 1, "steps_per_epoch": 1, "device": "cpu"}, with_tsne=False)
    det = res.detector
    print(f"{det.describe()}; data {a.data}; torch {torch.__version__}; best of {a.repeats}")
    with tempfile.TemporaryDirectory() as d:
        old, new = Path(d) / "m.pt", Path(d) / "m.osad"

        def save_old():  # exactly what earlier versions wrote
            torch.save({"format_version": 1, "method": det.name, "preset": det.preset, "config": det.config,
                        "backbone_info": det.backbone_info, "history": det.history, "state": det.state()}, old)

        rows = [
            (".pt  save (torch.save)", best_of(save_old, a.repeats)),
            (".osad save (atomic)", best_of(lambda: det.save(new), a.repeats)),
        ]
        with torch.serialization.safe_globals(_legacy_allowed_globals()):
            rows.append((".pt  read (weights_only=True)",
                         best_of(lambda: torch.load(old, map_location="cpu", weights_only=True), a.repeats)))
        rows += [
            (".osad read (checked, hashed)", best_of(lambda: read_model(new), a.repeats)),
            (".pt  load_detector", best_of(lambda: load_detector(old, device="cpu"), a.repeats)),
            (".osad load_detector", best_of(lambda: load_detector(new, device="cpu"), a.repeats)),
        ]
        print(f"size .pt {old.stat().st_size:,} bytes, .osad {new.stat().st_size:,} bytes")
        for name, t in rows:
            print(f"  {name:36s} {t * 1000:8.1f} ms")


if __name__ == "__main__":
    main()

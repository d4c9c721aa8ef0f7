"""The frozen-feature cache on and off, alternating in one process (same data, same load).

    OMP_NUM_THREADS=1 python scripts/bench_feature_cache.py --data elpv headct --rounds 2

Per data set (general setting, 10 shots, seed 0, the benchmark's split with its held-out
share removed), it times two trainings with ``feature_cache_mb`` at its default and at 0:
CKAAD at its quick preset on the normals and labelled anomalies, and Fusion's
reconstruction part (CKAAD at half Fusion's size, trained on the normals alone as its gate
trains it). Prints each fit's seconds, its last epoch's loss and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from osad_core.data import resolve_dataset
from osad_core.methods.base import make_detector
from osad_core.methods.ckaad import CKAAD
from osad_core.operating_point import DEFAULT_CALIBRATION_FRACTION, split_calibration
from osad_core.protocol import Protocol, make_split


def trainings(data: str):
    split = make_split(resolve_dataset(data), Protocol("general", 10, 0))
    normals, _ = split_calibration(split.train_normal, DEFAULT_CALIBRATION_FRACTION, 0)
    # Fusion holds a share of its normals out for its own scales: about what its part trains on
    part_normals = normals[:int(len(normals) * 0.8)]

    def ckaad(mb):
        det = make_detector("ckaad", "quick", {"seed": 0, "feature_cache_mb": mb})
        return det, lambda: det.fit(normals, split.train_anomalies)

    def recon(mb):
        det = make_detector("fusion", "quick", {"seed": 0, "recon_feature_cache_mb": mb})._make_recon(gate=True)
        return det, lambda: det.fit(part_normals, [])
    return {"CKAAD quick": ckaad, "Fusion's reconstruction part": recon}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["elpv", "headct"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = []
    for data in a.data:
        for name, make in trainings(data).items():
            times = {"cached": [], "per draw": []}
            for rnd in range(a.rounds):
                for label, mb in (("cached", CKAAD.defaults["feature_cache_mb"]), ("per draw", 0)):
                    det, fit = make(mb)
                    t0 = time.perf_counter()
                    fit()
                    times[label].append(time.perf_counter() - t0)
                    print(f"{data:8s} {name:30s} round {rnd} {label:9s} {times[label][-1]:6.1f} s  "
                          f"last loss {det.history[-1]['loss']:.5f}", flush=True)
            best = {k: min(v) for k, v in times.items()}
            print(f"{data:8s} {name:30s} best {best['per draw']:.1f} s -> {best['cached']:.1f} s: "
                  f"{best['per draw'] / best['cached']:.2f}x faster", flush=True)
            out.append({"data": data, "training": name, "seconds": times, "speedup_best": best["per draw"] / best["cached"]})
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Would a reconstruction model stacked on Fusion help? Fusion and CKAAD fitted on one cell's split, their
image scores combined after the fact.

    OMP_NUM_THREADS=1 python scripts/bench_fusion_stack.py --data headct --shots 1 --seeds 0 1 2 \
        --json bench_results/fusion_stack/headct_general_1.json

Each (seed, seen class) follows the benchmark's protocol (the same split, 20 % of the training
normals held out for the operating point and never fitted). Both detectors fit on the rest at the
quick preset with their defaults. Their image scores on the test images and on the held-out
normals are stored per image, so any combination can be recomputed from the JSON. Printed: each
alone, and (1 − w)·z_Fusion + w·z_CKAAD for w in --weights, each part z-normalised on the
held-out normals that neither fitted ("calibrated"), and on the test normals (a diagnostic of
what the scale estimate costs, not a result).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from osad_core.data import resolve_dataset
from osad_core.methods.base import make_detector
from osad_core.operating_point import DEFAULT_CALIBRATION_FRACTION, split_calibration
from osad_core.protocol import Protocol, make_split

PARTS = ("fusion", "ckaad")


def fit_and_score(method: str, split, hold: list, seed: int, preset: str) -> dict:
    det = make_detector(method, preset, {"seed": seed})
    t0 = time.monotonic()
    det.fit(split.train_normal, split.train_anomalies)
    fit_s = time.monotonic() - t0
    test = det.predict(split.test, batch_size=det.config["test_batch_size"])
    cal = det.predict(hold, batch_size=det.config["test_batch_size"])
    return {"fit_s": round(fit_s, 1), "paths": [r.path for r in test.records],
            "labels": [int(r.label) for r in test.records], "test": test.scores.astype(float).tolist(),
            "cal": cal.scores.astype(float).tolist()}


def combine(run: dict, w: float, oracle: bool = False) -> np.ndarray:
    y = np.array(run["labels"])
    out = 0.0
    for part, weight in zip(PARTS, (1 - w, w)):
        s = np.array(run[part]["test"])
        ref = s[y == 0] if oracle else np.array(run[part]["cal"])
        out = out + weight * (s - ref.mean()) / max(ref.std(), 1e-12)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--setting", default="general")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--known-class", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 1 / 3, 0.5, 1.0])
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    ds = resolve_dataset(a.data)
    classes = (a.known_class or ds.defect_types) if a.setting == "hard" else [None]
    out_path = Path(a.json)
    res = json.loads(out_path.read_text()) if out_path.exists() else {
        "data": ds.name, "setting": a.setting, "shots": a.shots, "preset": a.preset, "runs": []}
    done = {(r["seed"], r["known_class"]) for r in res["runs"]}
    for seed in a.seeds:
        for kc in classes:
            if (seed, kc) in done:
                continue
            split = make_split(ds, Protocol(a.setting, a.shots, seed, kc))
            fit_normal, hold = split_calibration(split.train_normal, DEFAULT_CALIBRATION_FRACTION, seed)
            split = replace(split, train_normal=fit_normal)
            run = {"seed": seed, "known_class": kc, "n_hold": len(hold)}
            for m in PARTS:
                run[m] = fit_and_score(m, split, hold, seed, a.preset)
                assert run[m]["paths"] == run[PARTS[0]]["paths"]
            run["labels"] = run[PARTS[0]]["labels"]
            for m in PARTS:
                del run[m]["paths"], run[m]["labels"]
            y = np.array(run["labels"])
            run["auroc"] = {f"{w:.3f}": float(roc_auc_score(y, combine(run, w))) for w in a.weights}
            run["auroc_test_moments"] = {f"{w:.3f}": float(roc_auc_score(y, combine(run, w, True)))
                                         for w in a.weights}
            res["runs"].append(run)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(res))
            print(f"seed {seed} {kc or '-'}: " + "  ".join(f"w={k} {v:.4f}" for k, v in run["auroc"].items())
                  + f"  (fit s: fusion {run['fusion']['fit_s']}, ckaad {run['ckaad']['fit_s']})", flush=True)
    print()
    for key in ("auroc", "auroc_test_moments"):
        for w in res["runs"][0][key]:
            per_seed = {}
            for r in res["runs"]:
                per_seed.setdefault(r["seed"], []).append(r[key][w])
            vals = [np.mean(v) for v in per_seed.values()]
            print(f"{key:20s} w={w}  {np.mean(vals):.4f} ± {np.std(vals):.4f}  ({' / '.join(f'{v:.3f}' for v in vals)})")


if __name__ == "__main__":
    main()

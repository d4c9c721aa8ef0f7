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

``--evidence`` adds what a weight earned per cell would need: CKAAD fitted on the normals alone
(no labelled anomaly, no elastic copies: a pure reconstruction model, stored as ``ckaad_normal``)
and, for it and for Fusion's normal memory, the scores of the labelled anomalies and the held-out
normals. Neither of these two parts saw the labelled anomalies, so their AUROC on them is honest
evidence of how well each separates this cell's defects (``evidence`` in the JSON; the rule that
turns it into a weight is in the printout and in docs/BENCHMARKS.md).
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
import torch

from osad_core.data import IMAGE_CACHE, resolve_dataset
from osad_core.methods.base import make_detector
from osad_core.methods.fusion import _separation, topk_mean
from osad_core.operating_point import DEFAULT_CALIBRATION_FRACTION, split_calibration
from osad_core.protocol import Protocol, make_split

PARTS = ("fusion", "ckaad")


def fit_and_score(method: str, split, hold: list, seed: int, preset: str, overrides: dict | None = None,
                  anomalies: bool = True) -> tuple[dict, object]:
    det = make_detector(method, preset, dict(overrides or {}, seed=seed))
    t0 = time.monotonic()
    det.fit(split.train_normal, split.train_anomalies if anomalies else [])
    fit_s = time.monotonic() - t0
    test = det.predict(split.test, batch_size=det.config["test_batch_size"])
    cal = det.predict(hold, batch_size=det.config["test_batch_size"])
    out = {"fit_s": round(fit_s, 1), "paths": [r.path for r in test.records],
           "labels": [int(r.label) for r in test.records], "test": test.scores.astype(float).tolist(),
           "cal": cal.scores.astype(float).tolist()}
    if not anomalies:  # its scores of the labelled anomalies it did not see
        out["labelled"] = det.predict(split.train_anomalies).scores.astype(float).tolist()
    return out, det


@torch.no_grad()
def memory_scores(det, records: list) -> list[float]:
    """Fusion's normal memory alone: the raw image score (top-k mean of nearest-patch distances)."""
    arr, _, _ = IMAGE_CACHE.load_many(records, det.config["image_size"])
    return [float(v) for i in range(0, len(arr), 16)
            for v in topk_mean(det._knn(det._features(arr[i:i + 16])), det.config["memory_topk"])]


def separation(anom: list[float], normal: list[float]) -> float:
    """AUROC of the labelled anomalies against the held-out normals (ties count half): Fusion's gate's."""
    return _separation(torch.tensor(anom), torch.tensor(normal))


def earned_weight(ev: dict, w: float = 1 / 3) -> float:
    """w scaled by how well the reconstruction separates the labelled anomalies from held-out
    normals against how well the memory does (both honest: neither saw them), capped at w."""
    a_r, a_m = ev["recon_separation"], ev["memory_separation"]
    if a_m <= 0.5:
        return w if a_r > 0.5 else 0.0
    return w * float(np.clip((a_r - 0.5) / (a_m - 0.5), 0.0, 1.0))


def combine(run: dict, w: float, oracle: bool = False, parts: tuple[str, str] = PARTS) -> np.ndarray:
    y = np.array(run["labels"])
    out = 0.0
    for part, weight in zip(parts, (1 - w, w)):
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
    ap.add_argument("--evidence", action="store_true", help="also the normal-only reconstruction and the "
                    "memory's and its scores of the labelled anomalies (see the module docstring)")
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
            if (seed, kc) in done and not a.evidence:
                continue
            prev = next((r for r in res["runs"] if (r["seed"], r["known_class"]) == (seed, kc)), None)
            if prev is not None and "evidence" in prev:
                continue
            split = make_split(ds, Protocol(a.setting, a.shots, seed, kc))
            fit_normal, hold = split_calibration(split.train_normal, DEFAULT_CALIBRATION_FRACTION, seed)
            split = replace(split, train_normal=fit_normal)
            run = prev or {"seed": seed, "known_class": kc, "n_hold": len(hold)}
            fusion = None
            for m in PARTS:
                if m in run:
                    continue
                run[m], det = fit_and_score(m, split, hold, seed, a.preset)
                fusion = det if m == "fusion" else fusion
            if a.evidence:
                if fusion is None:  # the memory is needed again: refit Fusion (same seed, same memory)
                    fusion = make_detector("fusion", a.preset, {"seed": seed})
                    fusion.fit(split.train_normal, split.train_anomalies)
                run["ckaad_normal"], _ = fit_and_score("ckaad", split, hold, seed, a.preset,
                                                       {"elastic_anomalies": "never"}, anomalies=False)
                mem_a, mem_n = memory_scores(fusion, split.train_anomalies), memory_scores(fusion, hold)
                run["evidence"] = {
                    "memory_labelled": mem_a, "memory_hold": mem_n,
                    "memory_separation": separation(mem_a, mem_n),
                    "recon_separation": separation(run["ckaad_normal"]["labelled"], run["ckaad_normal"]["cal"])}
            run["labels"] = run["fusion"].get("labels", run.get("labels"))
            for m in ("fusion", "ckaad", "ckaad_normal"):  # every part scored the same images in the same order
                if m in run and "labels" in run[m]:
                    assert run[m]["labels"] == run["labels"], m
            for m in ("fusion", "ckaad", "ckaad_normal"):
                if m in run:
                    run[m].pop("paths", None)
                    run[m].pop("labels", None)
            y = np.array(run["labels"])
            run["auroc"] = {f"{w:.3f}": float(roc_auc_score(y, combine(run, w))) for w in a.weights}
            run["auroc_test_moments"] = {f"{w:.3f}": float(roc_auc_score(y, combine(run, w, True)))
                                         for w in a.weights}
            if a.evidence:
                ev = run["evidence"]
                ev["earned_w"] = earned_weight(ev)
                normal_parts = ("fusion", "ckaad_normal")
                run["auroc_normal_recon"] = {f"{w:.3f}": float(roc_auc_score(y, combine(run, w, parts=normal_parts)))
                                             for w in a.weights}
                run["auroc_earned"] = float(roc_auc_score(y, combine(run, ev["earned_w"], parts=normal_parts)))
                print(f"  evidence: memory {ev['memory_separation']:.3f}, reconstruction {ev['recon_separation']:.3f}"
                      f" -> w {ev['earned_w']:.3f}: {run['auroc_earned']:.4f}; normal-only reconstruction at "
                      + "  ".join(f"w={k} {v:.4f}" for k, v in run["auroc_normal_recon"].items()), flush=True)
            if prev is None:
                res["runs"].append(run)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(res))
            print(f"seed {seed} {kc or '-'}: " + "  ".join(f"w={k} {v:.4f}" for k, v in run["auroc"].items())
                  + f"  (fit s: fusion {run['fusion']['fit_s']}, ckaad {run['ckaad']['fit_s']})", flush=True)
    print()
    if a.evidence and all("auroc_earned" in r for r in res["runs"]):
        per_seed: dict = {}
        for r in res["runs"]:
            per_seed.setdefault(r["seed"], []).append(r["auroc_earned"])
        vals = [np.mean(v) for v in per_seed.values()]
        print(f"{'auroc_earned':20s}          {np.mean(vals):.4f} ± {np.std(vals):.4f}  "
              f"({' / '.join(f'{v:.3f}' for v in vals)})")
    for key in ("auroc", "auroc_test_moments", "auroc_normal_recon"):
        if not all(key in r for r in res["runs"]):
            continue
        for w in res["runs"][0][key]:
            per_seed = {}
            for r in res["runs"]:
                per_seed.setdefault(r["seed"], []).append(r[key][w])
            vals = [np.mean(v) for v in per_seed.values()]
            print(f"{key:20s} w={w}  {np.mean(vals):.4f} ± {np.std(vals):.4f}  ({' / '.join(f'{v:.3f}' for v in vals)})")


if __name__ == "__main__":
    main()

"""The operating-point table of docs/BENCHMARKS.md from scripts/operating_point_check.py's JSON.

    python scripts/operating_point_table.py bench_results/operating_point/*.json

"measured rejects": k of n test normals with the exact (Clopper-Pearson) 95 % interval of
the rate; "redrawn": where the run stored it, the mean count over random re-splits of the
pooled held-out and test normals and the share of re-splits rejecting at least k.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import binomtest

DATA = {"headct": "HeadCT", "elpv": "ELPV", "magnetic_tile": "magnetic tile"}
METHODS = ["fusion", "dra", "devnet", "bgad", "ckaad", "saliencycut", "ahl"]


def measured(r: dict) -> str:
    k, n = r["rejected_test_good"], r["test_good"]
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return f"{k} of {n} ({100 * ci.low:.1f}–{100 * ci.high:.1f} %)"


def redrawn(r: dict) -> str:
    d = r.get("redraw") or {}
    return f"{d['mean_rejects']:.2f}, {d['p_at_least']:.3f}" if d.get("draws") else "—"


def main(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text()) if r.get("promised_frr") is not None]
    rows.sort(key=lambda r: (list(DATA).index(r["data"]) if r["data"] in DATA else 9,
                             METHODS.index(r["method"]) if r["method"] in METHODS else 9, r["seed"]))
    print("| data | method | backbone | seed | image AUROC | calibration normals | promised FRR | test normals | "
          "expected rejects (95 % interval) | measured rejects (95 % interval of the rate) | redrawn: mean, P(≥ k) | "
          "recall at the point | best-F1 threshold rejects |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = r["interval"]
        promised = f"{100 * r['promised_frr']:.2f} %" + (" (floor)" if r.get("limited") else "")
        backbone = (r.get("backbone") or {}).get("name", "?").replace("EfficientNet-", "")
        print(f"| {DATA.get(r['data'], r['data'])} | {r['method']} | {backbone} | {r['seed']} | {r['auroc']:.3f} | "
              f"{r['n_calibration']} | {promised} | {r['test_good']} | {r['expected_rejects']:.2f} ({lo}–{hi}) | "
              f"{measured(r)} | {redrawn(r)} | "
              f"{100 * r['recall']:.1f} % | {r.get('best_f1_rejected_test_good', '—')} |")


if __name__ == "__main__":
    main(sys.argv[1:])

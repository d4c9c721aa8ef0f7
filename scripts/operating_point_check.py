"""Check the operating point: promised false-reject rate vs the one measured on test normals,
and what holding out calibration normals costs in AUROC.

    python scripts/operating_point_check.py --data headct --methods dra,bgad --fractions 0.2 0 \
        --seeds 0 --json bench_results/operating_point/headct.json

Each run: general setting, 10 shots, quick preset, no database, no t-SNE. ``redraw``:
the measured count against random re-splits of the same held-out and test normals
(:func:`osad_core.operating_point.redraw_check`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osad_core.data import resolve_dataset  # noqa: E402
from osad_core.experiment import run_experiment  # noqa: E402
from osad_core.operating_point import redraw_check  # noqa: E402
from osad_core.protocol import Protocol  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--methods", default="dra,bgad")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--target", type=float, default=0.01)
    p.add_argument("--preset", default="quick")
    p.add_argument("--json")
    a = p.parse_args()
    ds = resolve_dataset(a.data)
    rows = []
    for method in a.methods.split(","):
        for frac in a.fractions:
            for seed in a.seeds:
                res = run_experiment(ds, Protocol("general", 10, seed), method, a.preset, with_tsne=False,
                                     score_train=False, calibration_fraction=frac, target_frr=a.target)
                m = res.metrics
                row = {"data": ds.name, "method": method, "fraction": frac, "seed": seed,
                       "auroc": m.get("image_auroc"), "n_fit_normal": len(res.split.train_normal),
                       "train_s": round(res.train_seconds, 1), "backbone": res.detector.backbone_info}
                n_good = sum(r.label == 0 for r in res.prediction.records)
                if res.operating_point is not None:
                    op = res.operating_point
                    exp, lo, hi = op.false_rejects(n_good)
                    rejected = round(m["operating_point_frr_test"] * n_good)
                    row.update(n_calibration=op.n_calibration, promised_frr=op.frr, limited=op.limited,
                               test_good=n_good, expected_rejects=round(exp, 2), interval=[lo, hi],
                               rejected_test_good=rejected, measured_frr=m["operating_point_frr_test"],
                               recall=m.get("operating_point_recall_test"))
                    test_normal = res.prediction.scores[[r.label == 0 for r in res.prediction.records]]
                    row["redraw"] = redraw_check(res.calibration_prediction.scores, test_normal, a.target)
                best = m.get("best_f1_threshold")
                if best is not None:
                    normal = [s for r, s in zip(res.prediction.records, res.prediction.scores) if r.label == 0]
                    row["best_f1_rejected_test_good"] = int(sum(s >= best for s in normal))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "backbone"}), flush=True)
                if a.json:
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()

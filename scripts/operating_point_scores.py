"""The scores behind one operating-point cell, to see why a promise broke.

    python scripts/operating_point_scores.py --data elpv --method ckaad --json /tmp/elpv_ckaad_scores.json

The same run as scripts/operating_point_check.py (general setting, 10 shots, quick preset,
20 % of the training normals held out, target 1 %); writes the held-out ("calibration")
normals' and the test images' scores by path, and those of as many normals the detector
was fitted on (seen in training: do they score lower?), and prints the comparison:
per group the mean, upper quantiles and count at or above the threshold, the
two-sample Kolmogorov-Smirnov test of held-out against test normals, and the redraw check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402

from osad_core.data import resolve_dataset  # noqa: E402
from osad_core.experiment import run_experiment  # noqa: E402
from osad_core.operating_point import redraw_check  # noqa: E402
from osad_core.protocol import Protocol  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    res = run_experiment(resolve_dataset(a.data), Protocol("general", 10, a.seed), a.method, "quick",
                         with_tsne=False, score_train=False, calibration_fraction=0.2, target_frr=0.01)
    cal = res.calibration_prediction
    fit = res.split.train_normal
    pick = np.sort(np.random.default_rng(0).choice(len(fit), min(len(fit), len(cal.records)), replace=False))
    seen = res.detector.predict([fit[i] for i in pick])
    recs, scores = res.prediction.records, res.prediction.scores
    groups = {"calibration": dict(zip([r.path for r in cal.records], cal.scores.tolist())),
              "fit_normal": dict(zip([r.path for r in seen.records], seen.scores.tolist())),
              "test_normal": {r.path: float(s) for r, s in zip(recs, scores) if r.label == 0},
              "test_anomaly": {r.path: float(s) for r, s in zip(recs, scores) if r.label == 1}}
    thr = res.operating_point.threshold
    Path(a.json).write_text(json.dumps({"threshold": thr, "promised_frr": res.operating_point.frr, **groups}))
    for name, g in groups.items():
        s = np.array(list(g.values()))
        print(f"{name}: n={len(s)} mean {s.mean():.4f} q95 {np.quantile(s, 0.95):.4f} "
              f"q99 {np.quantile(s, 0.99):.4f} max {s.max():.4f}; at or above the threshold {int((s >= thr).sum())}")
    c, t = list(groups["calibration"].values()), list(groups["test_normal"].values())
    print(f"threshold {thr:.4f}; KS held-out vs test normals p = {ks_2samp(c, t).pvalue:.3f}; "
          f"redraw {redraw_check(c, t)}")


if __name__ == "__main__":
    main()

"""The operating point: a threshold chosen from held-out *normal* images only.

A fraction of the training normals is kept out of fitting ("calibration" images). After
training they are scored, and the threshold is the conformal order statistic that promises
at most a target false-reject rate on new good parts: with ``n`` calibration scores and
target ``alpha``, the ``k = ceil((n + 1)(1 - alpha))``-th smallest score. For a new good
part exchangeable with them, P(rejected) = (n + 1 - k) / (n + 1) <= alpha.

With ``n`` calibration normals the smallest rate that can be promised is ``1 / (n + 1)``
(``k = n``, the largest score); a smaller target is raised to it and says so.

For one fixed calibration set the realised false-reject rate is Beta(n + 1 - k, k)
distributed (Vovk 2012; Angelopoulos & Bates 2021, §3), so the number of good parts
rejected among ``m`` new ones is Beta-binomial(m, n + 1 - k, k): that gives the expected
count and its interval.

No torch here: the app, the CLI's ONNX path and the worker all use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_TARGET_FRR = 0.01
# 20 % of the training normals: on ELPV (1,131 training normals) that is 226 calibration
# images, enough to promise 1 %; measured not to cost AUROC beyond seed noise (README).
DEFAULT_CALIBRATION_FRACTION = 0.2
MIN_FIT_NORMALS = 8  # never hold out so many that fitting is left with fewer


@dataclass
class OperatingPoint:
    threshold: float | None  # flag a part when score >= threshold
    target_frr: float  # the rate asked for
    frr: float  # the rate promised: (n + 1 - k) / (n + 1), <= target unless too few normals
    n_calibration: int
    rank: int  # k: the threshold sits just above the k-th smallest calibration score

    @property
    def limited(self) -> bool:
        """True when too few calibration normals to promise the target rate."""
        return self.n_calibration > 0 and self.frr > self.target_frr + 1e-12

    @property
    def min_frr(self) -> float:
        return 1.0 / (self.n_calibration + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rule"] = "conformal: just above the ceil((n+1)(1-target))-th smallest held-out normal score"
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "OperatingPoint | None":
        if not d or "threshold" not in d:
            return None
        return cls(d["threshold"], float(d["target_frr"]), float(d["frr"]), int(d["n_calibration"]), int(d["rank"]))

    def false_rejects(self, n_good: int, level: float = 0.95) -> tuple[float, int, int]:
        """(expected, low, high): good parts rejected among ``n_good`` new ones, with the
        central ``level`` interval of the Beta-binomial count."""
        from scipy.stats import betabinom

        a, b = self.n_calibration + 1 - self.rank, self.rank
        if n_good <= 0 or b <= 0:
            return 0.0, 0, 0
        dist = betabinom(n_good, a, b)
        tail = (1 - level) / 2
        return n_good * a / (a + b), int(dist.ppf(tail)), int(dist.ppf(1 - tail))

    def sentence(self, n_good: int) -> str:
        """"Expect about 3 of 377 good parts rejected (95 % interval 0–8)." plus any limit."""
        exp, lo, hi = self.false_rejects(n_good)
        s = (f"Expect about {exp:.0f} of {n_good:,} good parts rejected (95 % interval {lo}–{hi}); "
             f"promised false-reject rate {100 * self.frr:.2g} % from {self.n_calibration} held-out normal images")
        if self.limited:
            s += (f". {self.n_calibration} held-out normals cannot promise {100 * self.target_frr:.2g} %: "
                  f"the smallest promisable rate is 1/{self.n_calibration + 1} = {100 * self.min_frr:.2g} %, used instead")
        return s


def conformal_threshold(calibration_scores, target_frr: float = DEFAULT_TARGET_FRR) -> OperatingPoint:
    """The operating point for ``target_frr`` from held-out normal scores (see module doc)."""
    if not 0 < target_frr < 1:
        raise ValueError(f"the target false-reject rate must be between 0 and 1, got {target_frr}")
    s = np.sort(np.asarray(calibration_scores, np.float64))
    s = s[np.isfinite(s)]
    n = len(s)
    if n == 0:
        return OperatingPoint(None, target_frr, 1.0, 0, 0)
    k = min(n, math.ceil((n + 1) * (1 - target_frr) - 1e-9))
    k = max(k, 1)
    # one float32 step above s_(k) (detectors score in float32, and NumPy compares float32
    # scores with a Python float in float32): a part scoring exactly s_(k) passes, as the bound assumes
    thr = float(np.nextafter(np.float32(s[k - 1]), np.float32(np.inf)))
    return OperatingPoint(thr, target_frr, (n + 1 - k) / (n + 1), n, k)


def split_calibration(normals: list, fraction: float, seed: int) -> tuple[list, list]:
    """(fit, calibration): a seeded random ``fraction`` of the normals held out from fitting,
    leaving at least :data:`MIN_FIT_NORMALS` to fit on. Paths are sorted first so the split
    does not depend on the filesystem's listing order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the calibration fraction must be in [0, 1), got {fraction}")
    recs = sorted(normals, key=lambda r: r.path)
    n_cal = min(int(round(fraction * len(recs))), max(0, len(recs) - MIN_FIT_NORMALS))
    if n_cal <= 0:
        return list(normals), []
    idx = np.random.default_rng(seed).permutation(len(recs))
    cal = set(idx[:n_cal].tolist())
    return [r for i, r in enumerate(recs) if i not in cal], [recs[i] for i in sorted(cal)]


def redraw_check(calibration_scores, test_normal_scores, target_frr: float = DEFAULT_TARGET_FRR,
                 draws: int = 10000, seed: int = 0) -> dict:
    """Is a broken promise bad luck in which normals calibrated, or are the test normals
    unlike the held-out ones? Pool both sets of (unseen) normals, split them again at random
    into sets of the same sizes ``draws`` times, recompute the threshold and count the
    rejected test normals. If the two sets are exchangeable the measured count is one such
    draw: ``p_at_least`` is the share of draws rejecting as many; ``mean_rejects`` should
    match the promise's expected count."""
    cal = np.asarray(calibration_scores, np.float64)
    test = np.asarray(test_normal_scores, np.float64)
    n = len(cal)
    op = conformal_threshold(cal, target_frr)
    if op.threshold is None or not len(test):
        return {"draws": 0}
    measured = int((test >= op.threshold).sum())
    pool = np.concatenate([cal, test])
    rng = np.random.default_rng(seed)
    # row r: a random permutation; its first n are that draw's calibration set
    perm = np.argsort(rng.random((draws, len(pool))), axis=1)
    cal_d, test_d = pool[perm[:, :n]], pool[perm[:, n:]]
    thr = np.partition(cal_d, op.rank - 1, axis=1)[:, op.rank - 1]  # the k-th smallest per draw
    rejects = (test_d > thr[:, None]).sum(1)  # > s_(k): conformal_threshold's one float32 step above it
    return {"draws": draws, "measured_rejects": measured, "mean_rejects": float(rejects.mean()),
            "p_at_least": float(np.mean(rejects >= measured)),
            "interval": [int(np.quantile(rejects, 0.025)), int(np.quantile(rejects, 0.975))]}

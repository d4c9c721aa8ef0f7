"""Has the line drifted? New scores against the run's held-out normal scores.

The two-sample Kolmogorov–Smirnov test (SciPy) says whether the two score distributions
differ; the population stability index (PSI, ten bins at the reference's deciles) says by
how much, on the scale quality engineers know (< 0.1 stable, 0.1–0.25 some shift,
> 0.25 large). A scored folder holding many defective parts also shifts: the warning says so.
No torch here: the ONNX scoring path uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SCORES = 20  # fewer new scores say too little about a distribution
P_WARN = 0.01


@dataclass
class Drift:
    ks: float
    p_value: float
    psi: float
    n_reference: int
    n_new: int

    @property
    def drifted(self) -> bool:
        return self.p_value < P_WARN

    def sentence(self) -> str:
        p = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"
        stats = f"KS {self.ks:.2f}, {p}; PSI {self.psi:.2f}; {self.n_new} new vs {self.n_reference} held-out normal scores"
        if self.drifted:
            return (f"Drift warning: these scores differ from the run's held-out normals ({stats}). The line may "
                    "have changed (lighting, parts, camera), or many of these parts are defective: check a sample "
                    "before trusting the false-reject promise.")
        return f"No drift detected against the run's held-out normals ({stats})."


def psi(reference, new, bins: int = 10) -> float:
    ref = np.asarray(reference, np.float64)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    r = np.histogram(ref, edges)[0] / len(ref)
    n = np.histogram(np.asarray(new, np.float64), edges)[0] / len(new)
    r, n = np.clip(r, 1e-4, None), np.clip(n, 1e-4, None)  # empty bins: no infinite terms
    return float(np.sum((n - r) * np.log(n / r)))


def compare(reference, new) -> Drift | None:
    """None when either side has too few scores to compare."""
    from scipy.stats import ks_2samp

    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    if len(reference) < 2 or len(new) < MIN_SCORES:
        return None
    res = ks_2samp(reference, new)
    return Drift(float(res.statistic), float(res.pvalue), psi(reference, new), len(reference), len(new))

"""The job's t-SNE stage above its cap: a map fitted on a fixed sample, every other
embedding placed into it, progress through the job's stages, cancel between chunks."""
from __future__ import annotations

import numpy as np
import pytest

from osad_core import evaluate
from osad_core.train import Callbacks, TrainingCancelled


def _clusters(n: int = 600, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    # clusters that touch a little: a careless placement mixes them, a good one does not
    x = rng.normal(0, 1, (k, 64))[lab] * 1.2 + rng.normal(0, 1, (n, 64))
    return x.astype(np.float32), lab


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(evaluate, "TSNE_FIT_MAX", 200)
    monkeypatch.setattr(evaluate, "TSNE_PLACE_CHUNK", 100)


def test_above_the_cap_every_point_is_placed_next_to_its_own_cluster(small_cap):
    x, lab = _clusters()
    seen = []
    y = evaluate.tsne_2d(x, seed=3, callbacks=Callbacks(seen.append, every_s=0))
    assert y.shape == (600, 2) and np.isfinite(y).all()

    fitted = evaluate.tsne_fit_sample(600, seed=3)
    assert len(fitted) == 200
    placed = np.setdiff1d(np.arange(600), fitted)
    # each placed point's nearest fitted point on the map belongs to its own cluster
    d = np.linalg.norm(y[placed, None, :] - y[None, fitted, :], axis=2)
    same = lab[fitted[d.argmin(1)]] == lab[placed]
    assert same.mean() >= 0.9, same.mean()
    # and the same seed gives the same map
    np.testing.assert_allclose(y, evaluate.tsne_2d(x, seed=3), atol=1e-4)

    assert {p.stage for p in seen} == {"t-SNE map"}
    fit = [p for p in seen if "fitting the map on a fixed sample of 200 of 600" in p.message]
    assert fit[-1].message.endswith("step 750 of 750") and all(p.total == 0 for p in fit)
    placing = [p for p in seen if p.message.startswith("placing the other 400")]
    assert [p.step for p in placing] == [200, 300, 400, 500, 600] and {p.total for p in placing} == {600}
    assert placing[1].eta_s is not None and placing[-1].text().startswith("Stage 1/1 · t-SNE map · 600/600")


def test_at_or_below_the_cap_the_map_is_fitted_as_before_and_counts_its_steps(small_cap):
    x, lab = _clusters(200)
    seen = []
    y = evaluate.tsne_2d(x, seed=1, callbacks=Callbacks(seen.append, every_s=0))
    assert evaluate.tsne_fit_sample(200, seed=1) is None
    # progress reporting does not move a point
    np.testing.assert_allclose(y, evaluate.tsne_2d(x, seed=1), atol=1e-4)
    steps = [p.step for p in seen if p.total]
    assert steps[0] == 0 and steps[-1] == 750 and steps == sorted(steps) and len(set(steps)) == 16
    assert {p.total for p in seen} == {750}


def test_a_cancel_stops_the_placing_between_chunks(small_cap):
    x, _ = _clusters()
    seen = []

    def stop() -> bool:
        return any(p.step >= 300 for p in seen if p.message.startswith("placing"))

    with pytest.raises(TrainingCancelled):
        evaluate.tsne_2d(x, seed=3, callbacks=Callbacks(seen.append, stop, every_s=0))
    assert max(p.step for p in seen) == 300

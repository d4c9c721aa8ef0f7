"""What to label next (``osad_core.active``): ranking, diversity, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from osad_core.active import farthest_first, priority, rounds_table, select_next


def _clusters(rng, centers: int = 4, per: int = 30, dim: int = 8):
    """Tight clusters of near-copies in embedding space."""
    c = rng.normal(size=(centers, dim)) * 5
    emb = np.concatenate([c[i] + rng.normal(scale=0.01, size=(per, dim)) for i in range(centers)])
    return emb, np.repeat(np.arange(centers), per)


def test_uncertain_ranks_by_distance_to_the_operating_point():
    scores = np.array([0.1, 0.48, 0.9, 0.55, 0.3])
    assert priority(scores, "uncertain", threshold=0.5).tolist() == [1, 3, 4, 0, 2]
    assert priority(scores, "anomalous").tolist() == [2, 3, 1, 4, 0]


def test_uncertain_needs_a_threshold_and_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        priority(np.zeros(3), "uncertain", threshold=None)
    with pytest.raises(ValueError, match="Unknown strategy"):
        priority(np.zeros(3), "entropy")
    with pytest.raises(ValueError, match="not finite"):
        priority(np.array([0.0, np.nan]), "anomalous")


def test_top_k_takes_near_copies_diverse_queue_covers_every_cluster():
    rng = np.random.default_rng(0)
    emb, cluster = _clusters(rng)
    # cluster 0 holds the highest scores: a plain top-8 is eight near-copies of one part
    scores = rng.uniform(0, 1, len(emb)) + 10 * (cluster == 0) + 5 * (cluster == 1) + 2 * (cluster == 2)
    plain = select_next(scores, emb, n=8, strategy="anomalous", diverse=False)
    assert set(cluster[plain]) == {0}
    diverse = select_next(scores, emb, n=8, strategy="anomalous", pool_factor=15)
    assert set(cluster[diverse]) == {0, 1, 2, 3}
    # the most anomalous image is always in, first; no image twice
    assert diverse[0] == int(np.argmax(scores))
    assert len(set(diverse.tolist())) == 8
    # the queue is listed in the strategy's order
    assert np.all(np.diff(scores[diverse]) <= 0)


def test_diversity_stays_among_the_top_candidates():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 5))
    scores = np.arange(200, dtype=float)
    pick = select_next(scores, emb, n=10, strategy="anomalous", pool_factor=4)
    assert set(pick.tolist()) <= set(range(160, 200))  # the top 4 × 10


def test_labelled_images_count_as_already_covered():
    rng = np.random.default_rng(2)
    emb, cluster = _clusters(rng, centers=3, per=20)
    scores = np.ones(len(emb))
    scores[0] = 2.0  # the first pick is from cluster 0 in any case
    labelled = emb[cluster == 1][:3] + 0.001  # cluster 1 is already labelled
    pick = select_next(scores, emb, n=2, strategy="anomalous", labelled_embeddings=labelled, pool_factor=30)
    assert sorted(cluster[pick].tolist()) == [0, 2]


def test_farthest_first_is_a_k_center_cover():
    pts = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert farthest_first(pts, 4) == [0, 3, 2, 4]
    assert farthest_first(pts, 10) == [0, 3, 2, 4, 1]  # at most every row once
    assert farthest_first(pts, 0) == []


def test_bad_shapes_say_what_is_wrong():
    with pytest.raises(ValueError, match="one embedding per score"):
        select_next(np.zeros(4), np.zeros((3, 2)), n=2, strategy="anomalous")
    with pytest.raises(ValueError, match="different sizes"):
        select_next(np.zeros(4), np.zeros((4, 2)), n=2, strategy="anomalous", labelled_embeddings=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least one"):
        select_next(np.zeros(4), None, n=0, strategy="anomalous")


def test_random_is_reproducible_and_fewer_candidates_than_asked():
    s = np.linspace(0, 1, 30)
    a = select_next(s, None, n=5, strategy="random", seed=3)
    assert a.tolist() == select_next(s, None, n=5, strategy="random", seed=3).tolist()
    assert len(select_next(s[:3], np.eye(3), n=24, strategy="anomalous")) == 3


def test_rounds_are_numbered_in_time_order_and_skip_unfinished_runs():
    runs = [{"id": 3, "finished_at": 30}, {"id": 1, "finished_at": 10}, {"id": 2, "finished_at": None}]
    assert [(r["id"], r["round"]) for r in rounds_table(runs)] == [(1, 1), (3, 2)]

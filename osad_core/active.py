"""Active learning: which unlabelled images to label next.

After a run, every unlabelled image has a score and an embedding. A strategy ranks them
("closest to the operating point" = the detector is least sure; "most anomalous" = the
likeliest new defects), then greedy k-center (farthest-first) in embedding space picks
the queue among the top ``pool_factor × n`` of that ranking, so the queue covers
different kinds of images instead of ``n`` near-copies of one. Already labelled images'
embeddings count as picked, so the queue also avoids what is known.

Pure numpy: the app, the CLI and ``scripts/bench_active.py`` share it.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = {
    "uncertain": "closest to the operating point (uncertainty)",
    "anomalous": "most anomalous",
    "random": "random",
}
DEFAULT_N = 24
POOL_FACTOR = 4


def priority(scores: np.ndarray, strategy: str, threshold: float | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of ``scores`` from most to least worth labelling under ``strategy``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Some scores are not finite numbers.")
    if strategy == "uncertain":
        if threshold is None or not np.isfinite(threshold):
            raise ValueError("“Closest to the operating point” needs a run with a threshold.")
        return np.argsort(np.abs(scores - float(threshold)), kind="stable")
    if strategy == "anomalous":
        return np.argsort(-scores, kind="stable")
    return (rng or np.random.default_rng(0)).permutation(len(scores))


def _unit(x: np.ndarray) -> np.ndarray:
    # cosine geometry: feature norms differ between backbones and layers, directions matter
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def farthest_first(emb: np.ndarray, k: int, anchors: np.ndarray | None = None, first: int = 0) -> list[int]:
    """Greedy k-center: take row ``first`` (the best-ranked candidate), then repeatedly the
    row farthest from everything taken and from ``anchors``; ties go to the earlier row."""
    emb = _unit(emb)
    k = min(k, len(emb))
    if k <= 0:
        return []
    dist = np.full(len(emb), np.inf)
    if anchors is not None and len(anchors):
        a = _unit(anchors)
        for start in range(0, len(a), 4096):  # bounded memory for large labelled sets
            # unit vectors: |e - a|^2 = 2 - 2 e.a, one matrix product instead of an (N, M, D) array
            sim = emb @ a[start:start + 4096].T
            dist = np.minimum(dist, np.sqrt(np.clip(2.0 - 2.0 * sim.max(1), 0.0, None)))
    picked: list[int] = []
    nxt = first
    for _ in range(k):
        picked.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
        dist[picked] = -1.0
        nxt = int(np.argmax(dist))
    return picked


def select_next(scores, embeddings, n: int = DEFAULT_N, strategy: str = "uncertain",
                threshold: float | None = None, labelled_embeddings=None, pool_factor: int = POOL_FACTOR,
                diverse: bool = True, seed: int = 0) -> np.ndarray:
    """Indices (into ``scores``) of the ``n`` unlabelled images to label next, best first.

    ``scores`` (N,) and ``embeddings`` (N, D) describe the unlabelled candidates;
    ``labelled_embeddings`` (M, D) the images already labelled. With ``diverse=False``
    it is the plain top ``n`` of the strategy's ranking (for comparison).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if n < 1:
        raise ValueError("Ask for at least one image.")
    order = priority(scores, strategy, threshold, np.random.default_rng(seed))
    if not diverse or embeddings is None:
        return order[:n]
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(scores):
        raise ValueError(f"Expected one embedding per score ({len(scores)}), got an array of shape {emb.shape}.")
    pool = order[:max(n, pool_factor * n)]
    anchors = None
    if labelled_embeddings is not None and len(labelled_embeddings):
        anchors = np.asarray(labelled_embeddings, dtype=np.float64)
        if anchors.ndim != 2 or anchors.shape[1] != emb.shape[1]:
            raise ValueError("Labelled and unlabelled embeddings have different sizes.")
    picked = farthest_first(emb[pool], n, anchors=anchors, first=0)
    # present the queue in the strategy's order: the most wanted image first
    rank = {int(p): r for r, p in enumerate(pool)}
    chosen = sorted((int(pool[i]) for i in picked), key=rank.get)
    return np.asarray(chosen, dtype=np.int64)


def rounds_table(runs: list[dict]) -> list[dict]:
    """One row per labelling round: ``runs`` (dicts with id, finished_at, n_train_normal,
    n_train_anomaly and metric values) of one configuration, in time order, numbered."""
    done = sorted((r for r in runs if r.get("finished_at") is not None), key=lambda r: (r["finished_at"], r["id"]))
    return [dict(r, round=i + 1) for i, r in enumerate(done)]


__all__ = ["STRATEGIES", "DEFAULT_N", "priority", "farthest_first", "select_next", "rounds_table"]

"""The labelling loop: which images to label next after a run, and whether each round of
labels helped.

The queue comes from ``osad_core.active`` on what the run stored (its scores of the
unlabelled images and everyone's embeddings); nothing is recomputed. A *round* is one
finished run of the same configuration (method, preset, protocol); rounds
are compared on the held-out images of the run being looked at.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from db import session_scope
from osad_core import active

# the Label page's sort that lists a queue in its strategy's order
QUEUE_SORTS = {"uncertain": "uncertain", "anomalous": "score_desc", "random": "name"}


def strategies(run) -> dict[str, str]:
    """Strategies a run supports: uncertainty needs its operating point (threshold)."""
    out = {k: v for k, v in active.STRATEGIES.items() if k != "random"}
    if run.threshold is None:
        out.pop("uncertain")
    return out


ANCHORS_MAX = 5000  # labelled images' embeddings the queue keeps away from (a seeded sample above)


def make_queue(run, n: int = active.DEFAULT_N, strategy: str = "uncertain") -> tuple[list[int], str]:
    """Image ids of the ``n`` images of the project to label next (unlabelled now, scored
    by ``run``), and a sentence saying what the diversity step compared them with.

    Only what the queue needs is read: the strategy's top ``POOL_FACTOR × n`` unlabelled
    images by ``ORDER BY … LIMIT`` and their embeddings, and the embeddings of the
    labelled images (a seeded sample of ``ANCHORS_MAX`` when there are more), so a run
    of 100,000 images is never loaded whole."""
    from db import score_views as sv

    pool_n = max(n, active.POOL_FACTOR * n)
    with session_scope() as s:
        if strategy == "random":
            ids = sv.unlabelled_scored_ids(s, run.id)
            order = np.random.default_rng(run.id).permutation(len(ids))[:pool_n]
            pool = [(ids[i], 0.0) for i in order]
        else:
            if strategy == "uncertain" and run.threshold is None:
                raise ValueError("“Closest to the operating point” needs a run with a threshold.")
            pool = sv.unlabelled_pool(s, run.id, strategy, run.threshold, pool_n)
        if not pool:
            raise ValueError(f"Run {run.id} scored no image that is unlabelled now: add new images to the project "
                             "and train again to get a queue.")
        emb = sv.embeddings_of(s, run.id, [i for i, _ in pool])
        labelled = sv.labelled_embedding_ids(s, run.id) if len(emb) == len(pool) else []
        n_labelled = len(labelled)
        if n_labelled > ANCHORS_MAX:
            pick = np.random.default_rng(run.id).choice(n_labelled, ANCHORS_MAX, replace=False)
            labelled = [labelled[i] for i in np.sort(pick)]
        anchors = sv.embeddings_of(s, run.id, labelled)
    if len(emb) < len(pool):  # some images have no embedding under this run: the plain ranking
        return [i for i, _ in pool[:n]], "in the strategy's order (the run stored no embeddings to spread it)"
    ids = [i for i, _ in pool]
    # the pool is in the strategy's order: k-center from its best image, the queue in that order
    pick = sorted(active.farthest_first(np.stack([emb[i] for i in ids]), n, first=0,
                                        anchors=np.stack(list(anchors.values())) if anchors else None))
    if not anchors:
        note = "spread over the run's embedding space"
    elif len(anchors) < n_labelled:
        note = (f"spread over the run's embedding space, away from a sample of {len(anchors):,} of the "
                f"{n_labelled:,} labelled images")
    else:
        note = f"spread over the run's embedding space, away from the {n_labelled:,} labelled images"
    return [int(ids[i]) for i in pick], note


def _config_key(run) -> tuple:
    # what a retrain repeats (``training.request_for_run``); the stored config also holds
    # per-run facts (display range, skipped images), so it is not part of the key
    proto = run.protocol_json or {}
    return (run.method, run.preset) + tuple(proto.get(k) for k in ("setting", "shots", "seed", "known_class"))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def rounds(run_summaries, run) -> list[dict[str, Any]]:
    """The finished runs of ``run``'s configuration in time order, one row per round.

    AUROC overall, on the defect types each round was shown (seen) and on the others
    (unseen) are computed from the stored scores on the held-out images that *every*
    round held out, with today's labels, so the rounds are measured on the same images.
    """
    key = _config_key(run)
    same = [r.run for r in run_summaries if r.run.status == "done" and _config_key(r.run) == key]
    from db import score_views as sv

    with session_scope() as s:  # the held-out rows only, not every score of each run
        scores = {r.id: {x["image_id"]: x for x in sv.held_out_rows(s, r.id)} for r in same}
    common = sorted(set.intersection(*(set(v) for v in scores.values()))) if scores else []
    rows = []
    for r in same:
        xs = [scores[r.id][i] for i in common if scores[r.id][i]["label"] != "unlabeled"]
        y = np.array([x["label"] == "anomaly" for x in xs], bool)
        sc = np.array([x["score"] for x in xs], float)
        seen_types = set(r.seen_defect_types or [])
        seen = np.array([x["defect_type"] in seen_types for x in xs], bool)
        row = {"id": r.id, "finished_at": r.finished_at, "n_test": len(xs),
               "labelled": (r.n_train_normal or 0) + (r.n_train_anomaly or 0), "anomalies": r.n_train_anomaly or 0,
               "image_auroc": _auroc(y, sc) if len(xs) else None}
        for name, pick in (("seen", seen), ("unseen", ~seen)):
            keep = ~y | pick
            row[f"image_auroc_{name}"] = _auroc(y[keep], sc[keep]) if y[keep].any() else None
        rows.append(row)
    return active.rounds_table(rows)


__all__ = ["ANCHORS_MAX", "QUEUE_SORTS", "strategies", "make_queue", "rounds"]

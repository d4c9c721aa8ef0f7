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
from db import queries as q
from osad_core import active

# the Label page's sort that lists a queue in its strategy's order
QUEUE_SORTS = {"uncertain": "uncertain", "anomalous": "score_desc", "random": "name"}


def strategies(run) -> dict[str, str]:
    """Strategies a run supports: uncertainty needs its operating point (threshold)."""
    out = {k: v for k, v in active.STRATEGIES.items() if k != "random"}
    if run.threshold is None:
        out.pop("uncertain")
    return out


def make_queue(run, n: int = active.DEFAULT_N, strategy: str = "uncertain") -> list[int]:
    """Image ids of the ``n`` images of the project to label next (unlabelled now, scored by ``run``)."""
    with session_scope() as s:
        rows = q.run_scores(s, run.id)
        ids, emb, _ = q.run_embeddings(s, run.id)
    cand = [r for r in rows if r["label"] == "unlabeled"]
    if not cand:
        raise ValueError(f"Run {run.id} scored no image that is unlabelled now: add new images to the project "
                         "and train again to get a queue.")
    pos = {int(i): k for k, i in enumerate(ids)}
    emb_c = emb[[pos[r["image_id"]] for r in cand]] if all(r["image_id"] in pos for r in cand) else None
    labelled = [pos[r["image_id"]] for r in rows if r["label"] != "unlabeled" and r["image_id"] in pos]
    emb_l = emb[labelled] if emb_c is not None and labelled else None
    pick = active.select_next(np.array([r["score"] for r in cand]), emb_c, n=n, strategy=strategy,
                              threshold=run.threshold, labelled_embeddings=emb_l, seed=run.id)
    return [int(cand[i]["image_id"]) for i in pick]


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
    with session_scope() as s:
        scores = {r.id: {x["image_id"]: x for x in q.run_scores(s, r.id) if x["role"] == "test"} for r in same}
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


__all__ = ["QUEUE_SORTS", "strategies", "make_queue", "rounds"]

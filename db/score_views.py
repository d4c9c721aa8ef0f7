"""Reads behind the views of one run's scores, sized for runs of 100,000 images.

Results, Inspect and the Label page's “Label next” ask the database for what they
draw, never for every score of a run: counts, confusion counts and histograms are
aggregated in SQL (exact), a ranked list is read one page at a time with ``ORDER BY …
LIMIT``, and where a view draws points (the t-SNE map) or compares against many
embeddings, a fixed-size seeded sample is read and the page says “sample of N”.

Like :mod:`db.queries`, every function takes a session first and never commits.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Integer, and_, case, cast, func, or_, select
from sqlalchemy.orm import Session

from .heatmaps import decode_vector
from .models import Embedding, Image, ImageScore

_CHUNK = 500  # ids per IN list

# The images a run's metrics were measured on (``ui.figures.evaluation_frame``).
EVAL_LABELS = ("normal", "anomaly")


def _roles(q, roles: Iterable[str] | None):
    roles = list(roles or [])
    return q.where(ImageScore.role.in_(roles)) if roles else q


def role_counts(s: Session, run_id: int) -> dict[str, int]:
    """Scored images of the run by role (``test``, ``calibration``, ``scored``, …)."""
    rows = s.execute(select(ImageScore.role, func.count()).where(ImageScore.run_id == run_id)
                     .group_by(ImageScore.role))
    return {role: int(n) for role, n in rows}


def role_scores(s: Session, run_id: int, role: str) -> np.ndarray:
    """Every score of one role, as float64 (one column: the calibration normals that set
    the operating point, a fifth of the training normals at most)."""
    return np.fromiter(s.scalars(select(ImageScore.score).where(ImageScore.run_id == run_id,
                                                                 ImageScore.role == role)), np.float64)


def _evaluation(run_id: int):
    return and_(ImageScore.run_id == run_id, ImageScore.role == "test", ImageScore.label_at_run.in_(EVAL_LABELS))


def evaluation_groups(s: Session, run_id: int, threshold: float | None = None) -> list[dict[str, Any]]:
    """The held-out labelled images by (label, defect type, seen) at the run's time: how
    many, their lowest and highest score, and how many score at or above ``threshold``
    (all exact, from one grouped query)."""
    flagged = (func.sum(case((ImageScore.score >= threshold, 1), else_=0)) if threshold is not None
               else func.sum(0))
    q = (select(ImageScore.label_at_run, ImageScore.defect_type_at_run, ImageScore.seen, func.count(),
                func.min(ImageScore.score), func.max(ImageScore.score), flagged)
         .where(_evaluation(run_id))
         .group_by(ImageScore.label_at_run, ImageScore.defect_type_at_run, ImageScore.seen))
    return [{"label_at_run": lab, "defect_type_at_run": dt, "seen": seen, "n": int(n), "min": float(lo),
             "max": float(hi), "flagged": int(f or 0)} for lab, dt, seen, n, lo, hi, f in s.execute(q)]


def confusion_counts(groups: Sequence[dict[str, Any]]) -> dict[str, int]:
    """tn / fp / fn / tp from :func:`evaluation_groups` rows (score >= threshold flags)."""
    c = {"tn": 0, "fp": 0, "fn": 0, "tp": 0}
    for g in groups:
        if g["label_at_run"] == "anomaly":
            c["tp"] += g["flagged"]
            c["fn"] += g["n"] - g["flagged"]
        else:
            c["fp"] += g["flagged"]
            c["tn"] += g["n"] - g["flagged"]
    return c


def _bin(s: Session, lo: float, width: float, bins: int):
    x = (ImageScore.score - lo) / width
    # floor: SQLite's CAST truncates (scores are >= lo, so that is floor); PostgreSQL's rounds
    b = cast(x, Integer) if s.get_bind().dialect.name == "sqlite" else cast(func.floor(x), Integer)
    return case((b >= bins, bins - 1), (b < 0, 0), else_=b)


def evaluation_histogram(s: Session, run_id: int, lo: float, hi: float, bins: int = 40) -> list[dict[str, Any]]:
    """Exact histogram of the held-out labelled images' scores: ``bins`` equal bins over
    [lo, hi] (a score equal to ``hi`` falls in the last), counted in SQL per bin and per
    (label, defect type, seen). Rows: bin, label_at_run, defect_type_at_run, seen, n."""
    width = (hi - lo) / bins if hi > lo else 1.0
    b = _bin(s, lo, width, bins).label("bin")
    q = (select(b, ImageScore.label_at_run, ImageScore.defect_type_at_run, ImageScore.seen, func.count())
         .where(_evaluation(run_id))
         .group_by(b, ImageScore.label_at_run, ImageScore.defect_type_at_run, ImageScore.seen))
    return [{"bin": int(k), "label_at_run": lab, "defect_type_at_run": dt, "seen": seen, "n": int(n),
             "x0": lo + int(k) * width, "x1": lo + (int(k) + 1) * width} for k, lab, dt, seen, n in s.execute(q)]


# --- a run's images ranked by score (Inspect) ----------------------------------------------


def _order(ascending: bool):
    # ties keep the image id's order, as a stable sort of the rows by id would
    return (ImageScore.score.asc() if ascending else ImageScore.score.desc(), ImageScore.image_id.asc())


def ranked_count(s: Session, run_id: int, roles: Iterable[str] | None = None) -> int:
    q = _roles(select(func.count()).select_from(ImageScore).where(ImageScore.run_id == run_id), roles)
    return int(s.scalar(q) or 0)


_RANKED_COLUMNS = (ImageScore.image_id, Image.path, Image.rel_path, Image.label, Image.defect_type, Image.split,
                   ImageScore.score, ImageScore.role, ImageScore.label_at_run, ImageScore.defect_type_at_run,
                   ImageScore.seen)


def ranked_rows(s: Session, run_id: int, roles: Iterable[str] | None = None, ascending: bool = False,
                offset: int = 0, limit: int = 1) -> list[dict[str, Any]]:
    """Rows ``offset`` … ``offset + limit - 1`` of the run's images (of ``roles``; all when
    empty) ranked by score, with the image's path and *current* label."""
    q = _roles(select(*_RANKED_COLUMNS).join(Image, Image.id == ImageScore.image_id)
               .where(ImageScore.run_id == run_id), roles)
    q = q.order_by(*_order(ascending)).offset(max(0, int(offset))).limit(int(limit))
    return [dict(r._mapping) for r in s.execute(q)]


def rank_of(s: Session, run_id: int, image_id: int, roles: Iterable[str] | None = None,
            ascending: bool = False) -> int | None:
    """0-based position of ``image_id`` in :func:`ranked_rows`' order, or None when the run
    did not score it (or not in one of ``roles``)."""
    own = s.scalar(_roles(select(ImageScore.score).where(ImageScore.run_id == run_id,
                                                          ImageScore.image_id == image_id), roles))
    if own is None:
        return None
    before = ImageScore.score < own if ascending else ImageScore.score > own
    q = _roles(select(func.count()).select_from(ImageScore).where(
        ImageScore.run_id == run_id, or_(before, and_(ImageScore.score == own, ImageScore.image_id < image_id))),
        roles)
    return int(s.scalar(q) or 0)


# --- the labelling queue ------------------------------------------------------------------


def unlabelled_pool(s: Session, run_id: int, strategy: str, threshold: float | None, limit: int) -> list[tuple[int, float]]:
    """(image id, score) of the ``limit`` images the run scored that are unlabelled now and
    rank first under ``strategy`` (``uncertain``: closest to ``threshold``; ``anomalous``:
    highest score), ties by image id: the pool that ``osad_core.active`` picks a queue from."""
    key = {"uncertain": lambda: func.abs(ImageScore.score - float(threshold)),
           "anomalous": lambda: -ImageScore.score}[strategy]()
    q = (select(ImageScore.image_id, ImageScore.score).join(Image, Image.id == ImageScore.image_id)
         .where(ImageScore.run_id == run_id, Image.label == "unlabeled")
         .order_by(key, ImageScore.image_id).limit(int(limit)))
    return [(int(i), float(sc)) for i, sc in s.execute(q)]


def unlabelled_scored_ids(s: Session, run_id: int) -> list[int]:
    """Ids of the images the run scored that are unlabelled now, in id order."""
    q = (select(ImageScore.image_id).join(Image, Image.id == ImageScore.image_id)
         .where(ImageScore.run_id == run_id, Image.label == "unlabeled").order_by(ImageScore.image_id))
    return [int(i) for i in s.scalars(q)]


def labelled_embedding_ids(s: Session, run_id: int) -> list[int]:
    """Ids of the images labelled now that have an embedding under the run (ids only)."""
    q = (select(Embedding.image_id).join(Image, Image.id == Embedding.image_id)
         .where(Embedding.run_id == run_id, Image.label != "unlabeled").order_by(Embedding.image_id))
    return [int(i) for i in s.scalars(q)]


def embeddings_of(s: Session, run_id: int, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """The run's embedding of each of ``image_ids`` that has one (float32)."""
    out: dict[int, np.ndarray] = {}
    ids = [int(i) for i in image_ids]
    for k in range(0, len(ids), _CHUNK):
        rows = s.execute(select(Embedding.image_id, Embedding.vector, Embedding.dim)
                         .where(Embedding.run_id == run_id, Embedding.image_id.in_(ids[k:k + _CHUNK])))
        out.update({int(i): decode_vector(v, d) for i, v, d in rows})
    return out


# --- the t-SNE map --------------------------------------------------------------------------

_MAP_COLUMNS = (ImageScore.image_id, Image.rel_path, ImageScore.score, ImageScore.role, ImageScore.label_at_run,
                ImageScore.defect_type_at_run, ImageScore.seen, ImageScore.tsne_x, ImageScore.tsne_y)


def _on_map(run_id: int):
    return and_(ImageScore.run_id == run_id, ImageScore.tsne_x.is_not(None), ImageScore.tsne_y.is_not(None))


def map_count(s: Session, run_id: int) -> int:
    return int(s.scalar(select(func.count()).select_from(ImageScore).where(_on_map(run_id))) or 0)


def map_coordinates(s: Session, run_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, x, y) of every point on the run's map: three numeric columns, for the
    density layer and for finding the points inside a selected box."""
    rows = s.execute(select(ImageScore.image_id, ImageScore.tsne_x, ImageScore.tsne_y).where(_on_map(run_id))
                     .order_by(ImageScore.image_id)).all()
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, 0].astype(np.int64), a[:, 1], a[:, 2]


def map_points(s: Session, run_id: int, image_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Rows of the map's points (all, or those of ``image_ids``) with what their hover and
    colours need, in image id order."""
    q = select(*_MAP_COLUMNS).join(Image, Image.id == ImageScore.image_id).where(_on_map(run_id))
    if image_ids is None:
        return [dict(r._mapping) for r in s.execute(q.order_by(ImageScore.image_id))]
    ids = sorted({int(i) for i in image_ids})
    out: list[dict[str, Any]] = []
    for k in range(0, len(ids), _CHUNK):
        out += [dict(r._mapping) for r in s.execute(q.where(ImageScore.image_id.in_(ids[k:k + _CHUNK])))]
    return sorted(out, key=lambda r: r["image_id"])


def map_sample(s: Session, run_id: int, draw_max: int) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """What the map view reads: the rows of the points to draw (all, or a sample of
    ``draw_max`` seeded by the run id) and :func:`map_coordinates` of every point."""
    ids, x, y = map_coordinates(s, run_id)
    if len(ids) <= draw_max:
        return map_points(s, run_id), ids, x, y
    pick = np.sort(np.random.default_rng(run_id).choice(len(ids), draw_max, replace=False))
    return map_points(s, run_id, ids[pick].tolist()), ids, x, y


def find_on_map(s: Session, run_id: int, text: str, limit: int = 20) -> list[dict[str, Any]]:
    """Points of the run's map whose file name contains ``text`` (any case), by name: a
    way to every point, drawn or not."""
    q = (select(*_MAP_COLUMNS).join(Image, Image.id == ImageScore.image_id)
         .where(_on_map(run_id), Image.rel_path.icontains(text.strip(), autoescape=True))
         .order_by(Image.rel_path, ImageScore.image_id).limit(int(limit)))
    return [dict(r._mapping) for r in s.execute(q)]


def held_out_rows(s: Session, run_id: int) -> list[dict[str, Any]]:
    """The run's held-out (``test``) images with their score and *current* label and
    defect type: what the labelling rounds are recomputed on."""
    q = (select(ImageScore.image_id, ImageScore.score, Image.label, Image.defect_type)
         .join(Image, Image.id == ImageScore.image_id)
         .where(ImageScore.run_id == run_id, ImageScore.role == "test").order_by(ImageScore.image_id))
    return [dict(r._mapping) for r in s.execute(q)]


__all__ = ["EVAL_LABELS", "confusion_counts", "embeddings_of", "evaluation_groups", "evaluation_histogram",
           "find_on_map", "held_out_rows", "labelled_embedding_ids", "map_coordinates", "map_count", "map_points", "map_sample", "rank_of",
           "ranked_count", "ranked_rows", "role_counts", "role_scores", "unlabelled_pool", "unlabelled_scored_ids"]

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
from itertools import chain
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, Integer, and_, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from .heatmaps import decode_vector
from .models import Embedding, Image, ImageScore, Run

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


def _floor_bin(s: Session, x, lo: float, width: float, bins: int):
    """The bin of ``x`` among ``bins`` equal bins from ``lo`` (``x`` >= ``lo``); the top edge
    falls in the last bin, as in numpy's histograms."""
    x = (x - lo) / width
    # floor: SQLite's CAST truncates (x >= 0 here, so that is floor); PostgreSQL's rounds
    b = cast(x, Integer) if s.get_bind().dialect.name == "sqlite" else cast(func.floor(x), Integer)
    return case((b >= bins, bins - 1), else_=b)


def evaluation_histogram(s: Session, run_id: int, lo: float, hi: float, bins: int = 40) -> list[dict[str, Any]]:
    """Exact histogram of the held-out labelled images' scores: ``bins`` equal bins over
    [lo, hi] (a score equal to ``hi`` falls in the last), counted in SQL per bin and per
    (label, defect type, seen). Rows: bin, label_at_run, defect_type_at_run, seen, n."""
    width = (hi - lo) / bins if hi > lo else 1.0
    b = _floor_bin(s, ImageScore.score, lo, width, bins).label("bin")
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
    highest score), ties by image id: the pool that ``osad_core.active`` picks a queue from.

    Each part is read in the order of the (run, score) index and stops at ``limit``: the
    closest to the threshold are the ``limit`` closest above it merged with the ``limit``
    closest below, so nothing is sorted by distance in the database."""
    base = (select(ImageScore.image_id, ImageScore.score).join(Image, Image.id == ImageScore.image_id)
            .where(ImageScore.run_id == run_id, Image.label == "unlabeled"))
    if strategy == "anomalous":
        q = base.order_by(ImageScore.score.desc(), ImageScore.image_id).limit(int(limit))
        return [(int(i), float(sc)) for i, sc in s.execute(q)]
    if strategy != "uncertain":
        raise ValueError(f"Unknown strategy {strategy!r}.")
    thr = float(threshold)
    above = base.where(ImageScore.score >= thr).order_by(ImageScore.score.asc(), ImageScore.image_id)
    below = base.where(ImageScore.score < thr).order_by(ImageScore.score.desc(), ImageScore.image_id)
    rows = [(int(i), float(sc)) for part in (above, below) for i, sc in s.execute(part.limit(int(limit)))]
    return sorted(rows, key=lambda r: (abs(r[1] - thr), r[0]))[:int(limit)]


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


def map_extent(s: Session, run_id: int) -> tuple[int, float, float, float, float]:
    """(points, lowest x, highest x, lowest y, highest y) of the run's map, in one pass."""
    n, x0, x1, y0, y1 = s.execute(select(func.count(), func.min(ImageScore.tsne_x), func.max(ImageScore.tsne_x),
                                         func.min(ImageScore.tsne_y), func.max(ImageScore.tsne_y))
                                  .where(_on_map(run_id))).one()
    return int(n or 0), x0, x1, y0, y1


def map_count(s: Session, run_id: int) -> int:
    return int(s.scalar(select(func.count()).select_from(ImageScore).where(_on_map(run_id))) or 0)


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


def map_density(s: Session, run_id: int, bins: int = 80,
                extent: tuple[int, float, float, float, float] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every point of the map counted on a ``bins`` × ``bins`` grid over its extent
    (:func:`map_extent`, read now unless given), in SQL: (x centres, y centres,
    counts[y, x]); None for an empty map."""
    n, x0, x1, y0, y1 = extent or map_extent(s, run_id)
    if not n:
        return None
    wx, wy = ((x1 - x0) or 1.0) / bins, ((y1 - y0) or 1.0) / bins
    bx, by = _floor_bin(s, ImageScore.tsne_x, x0, wx, bins), _floor_bin(s, ImageScore.tsne_y, y0, wy, bins)
    z = np.zeros((bins, bins))
    for i, j, n in s.execute(select(bx, by, func.count()).where(_on_map(run_id)).group_by(bx, by)):
        z[j, i] = n
    return x0 + wx * (np.arange(bins) + 0.5), y0 + wy * (np.arange(bins) + 0.5), z


_HASH_MUL, _HASH_MOD = 2654435761, 4294967291  # Knuth's multiplicative hash, modulo a prime


def map_sample(s: Session, run_id: int, draw_max: int, total: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The rows of the points the map view draws, and how many points the map has
    (``total``, counted now unless given): all of them, or about ``draw_max`` whose image
    id hashes below a cut-off (the same sample on every visit, spread evenly over the
    images, and found without sorting the run)."""
    total = map_count(s, run_id) if total is None else int(total)
    q = select(*_MAP_COLUMNS).join(Image, Image.id == ImageScore.image_id).where(_on_map(run_id))
    if total > draw_max:
        cut = int(_HASH_MOD * draw_max / total)
        h = (cast(ImageScore.image_id, BigInteger) * literal(_HASH_MUL, BigInteger)) % literal(_HASH_MOD, BigInteger)
        q = q.where(h < literal(cut, BigInteger))
    return [dict(r._mapping) for r in s.execute(q.order_by(ImageScore.image_id))], total


def map_region(s: Session, run_id: int, x0: float, x1: float, y0: float, y1: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, x, y) of the map's points inside a box: what a box or a lasso (its
    bounding box, then the polygon) selects on a map that draws a sample."""
    rows = s.execute(select(ImageScore.image_id, ImageScore.tsne_x, ImageScore.tsne_y).where(
        _on_map(run_id), ImageScore.tsne_x.between(x0, x1), ImageScore.tsne_y.between(y0, y1))
        .order_by(ImageScore.image_id)).tuples().all()
    # from a flat iterator: numpy would read a list of many rows one element at a time
    a = np.fromiter(chain.from_iterable(rows), np.float64, count=3 * len(rows)).reshape(-1, 3)
    return a[:, 0].astype(np.int64), a[:, 1], a[:, 2]


def find_on_map(s: Session, run_id: int, text: str, limit: int = 20) -> list[dict[str, Any]]:
    """Points of the run's map whose file name contains ``text`` (any case), by name: a
    way to every point, drawn or not. Read along the project's images by name (an index),
    stopping at ``limit`` matches."""
    project = select(Run.project_id).where(Run.id == run_id).scalar_subquery()
    q = (select(*_MAP_COLUMNS).select_from(Image)
         .join(ImageScore, and_(ImageScore.image_id == Image.id, ImageScore.run_id == run_id))
         .where(Image.project_id == project, Image.rel_path.icontains(text.strip(), autoescape=True),
                ImageScore.tsne_x.is_not(None), ImageScore.tsne_y.is_not(None))
         .order_by(Image.rel_path, Image.id).limit(int(limit)))
    return [dict(r._mapping) for r in s.execute(q)]


def held_out_rows(s: Session, run_id: int) -> list[dict[str, Any]]:
    """The run's held-out (``test``) images with their score and *current* label and
    defect type: what the labelling rounds are recomputed on."""
    q = (select(ImageScore.image_id, ImageScore.score, Image.label, Image.defect_type)
         .join(Image, Image.id == ImageScore.image_id)
         .where(ImageScore.run_id == run_id, ImageScore.role == "test").order_by(ImageScore.image_id))
    return [dict(r._mapping) for r in s.execute(q)]


__all__ = ["EVAL_LABELS", "confusion_counts", "embeddings_of", "evaluation_groups", "evaluation_histogram",
           "find_on_map", "held_out_rows", "labelled_embedding_ids", "map_count", "map_density", "map_extent", "map_points", "map_region", "map_sample", "rank_of",
           "ranked_count", "ranked_rows", "role_counts", "role_scores", "unlabelled_pool", "unlabelled_scored_ids"]

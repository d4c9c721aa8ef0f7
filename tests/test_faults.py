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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_mvtec

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


def _start_worker(env: dict, log: Path, *args: str) -> subprocess.Popen:
    # its own process group: a kill takes the supervisor and its job process at once, as a crash would
    return subprocess.Popen([sys.executable, "-m", "osad_core", "-v", "worker", *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()  # reaped: its pid is gone, so the next worker sees it dead


def _job(db_url: str, job_id: int):
    with session_scope(db_url) as s:
        return q.get_job(s, job_id)


def _wait(pred, timeout: float, poll: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


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
    data_dir = Path(os.environ["OSAD_DATA_DIR"])
    pid = _project(db_url, tmp_path / "parts")
    jobs = [_enqueue(db_url, pid, "devnet"), _enqueue(db_url, pid, "dra")]
    # Crashes before a new checkpoint count against this limit (see recover_stale_jobs);
    # 20 kills in a row before any checkpoint must not fail a job here.
    env = _env(db_url, OSAD_JOB_MAX_ATTEMPTS="100")
    log = tmp_path / "worker.log"
    rng = random.Random(20261130)
    kills = int(os.environ.get("OSAD_FAULT_KILLS", "20"))
    for _ in range(kills):
        proc = _start_worker(env, log)
        time.sleep(rng.uniform(0.5, 6.0))
        _kill(proc)
    # a fresh worker finishes what is left, then leaves when idle
    proc = _start_worker(env, log, "--idle-exit", "1")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    resumed = {}
    with session_scope(db_url) as s:
        for run_id, job_id in jobs:
            job = q.get_job(s, job_id)
            assert job.status in TERMINAL and (job.status == "done" or job.error), (job, job.error)
            assert job.status == "done", job.error  # nothing here should fail
            resumed[run_id] = job.progress_json.get("resumed_from_epoch")
        attempts = [q.get_job(s, j).attempts for _, j in jobs]
        assert q.integrity_check(s) == "ok"
    metrics = {run_id: _check_run_complete(db_url, run_id) for run_id, _ in jobs}
    # the start-up sweep of the last worker left no orphan
    assert _orphans(data_dir, db_url) == []

    # the same jobs uninterrupted end with the same metrics, resumed or not
    again = [_enqueue(db_url, pid, "devnet"), _enqueue(db_url, pid, "dra")]
    proc = _start_worker(env, log, "--idle-exit", "0")
    assert proc.wait(timeout=300) == 0
    for (run_id, _), (ref_id, _) in zip(jobs, again):
        ref = _check_run_complete(db_url, ref_id)
        for m in (ref, metrics[run_id]):
            m.pop("test_images_per_s")  # a timing
        np.testing.assert_equal(metrics[run_id], ref)  # NaN equals NaN here
    print(f"\nkills injected {kills}; jobs completed {len(jobs)}/{len(jobs)}; runs lost 0; "
          f"attempts {attempts}; resumed from epoch {list(resumed.values())}")


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


PHASES = {"queued": None, "training": "training", "scoring": "scoring", "t-SNE": "t-SNE",
          "saving": "saving"}


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
                    msg = (job.progress_json or {}).get("message") or ""
                    return job.status in TERMINAL or msg.startswith(prefix)
                _wait(in_phase, 120, poll=0.02)
            t0 = time.monotonic()
            with session_scope(db_url) as s:
                q.request_cancel(s, job_id)
            job = _wait(lambda: (j := _job(db_url, job_id)).status in TERMINAL and j, 60)
            times.append(time.monotonic() - t0)
            outcomes[phase] = job.status
            if job.status == "done":  # the cancel came after the commit: the run is whole
                _check_run_complete(db_url, run_id)
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
    import torch

    from osad_core.worker import run_job_process

    pid = _project(db_url, tmp_path / "parts")
    run_id, job_id = _enqueue(db_url, pid, "devnet")
    monkeypatch.setenv("OSAD_DATABASE_URL", db_url)
    with session_scope(db_url) as s:
        q.claim_next_job(s, "w-disk")
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith(".tmp") and "models" in str(f):  # the model file, not checkpoints
            Path(f).write_bytes(b"half a model")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
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

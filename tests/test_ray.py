"""Ray as the executor: queued jobs, benchmark cells and scoring batches run as Ray tasks
on a local loopback cluster (one per module: starting Ray costs seconds), with results
in the same database and artefact folder as the local worker's.

Skipped with a reason where Ray is not installed (it is the optional extra
``requirements-cluster.txt``; CI installs it).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import make_mvtec, wait_until

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-cluster.txt)")

from db import init_db, session_scope  # noqa: E402
from db import queries as q  # noqa: E402
from osad_core import artefacts  # noqa: E402
from osad_core.cli import main as cli  # noqa: E402
from osad_core.data import load_folder  # noqa: E402
from osad_core.executors.ray import RayExecutor, RayJob, task_env  # noqa: E402
from osad_core.store import image_items  # noqa: E402
from osad_core.worker import run_worker  # noqa: E402

TINY = {"weights": "random", "backbone": "resnet18", "image_size": 32, "epochs": 2, "steps_per_epoch": 2,
        "device": "cpu"}
PROTOCOL = {"setting": "general", "shots": 2, "seed": 0}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request, tmp_path_factory):
    """One two-CPU Ray on loopback per database backend (starting Ray costs seconds); no
    token file in the home folder.

    The database URL and data folder are in the environment the cluster starts in, as
    ``ray start`` has them on each machine of a team; tasks never receive them. Yields the
    executor and that (url, data folder)."""
    data = tmp_path_factory.mktemp("cluster-data")
    server = None
    if request.param == "sqlite":
        url = f"sqlite:///{data / 'osad.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "OSAD_DATABASE_URL", "OSAD_DATA_DIR")}
    os.environ.update(RAY_AUTH_MODE="disabled", OSAD_DATABASE_URL=url, OSAD_DATA_DIR=str(data))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield RayExecutor("local"), (url, str(data))  # joins the running cluster
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if server is not None:
        import db

        db.dispose_engines()
        server.drop(url)


@pytest.fixture
def cluster_db(cluster, monkeypatch):
    """The test runs with the cluster's database and data folder (each test's own project)."""
    executor, (url, data) = cluster
    monkeypatch.setenv("OSAD_DATABASE_URL", url)
    monkeypatch.setenv("OSAD_DATA_DIR", data)
    return executor


@pytest.fixture
def no_db_cluster(cluster, request):
    """The cluster for tests that use no database: once, on the first backend."""
    if request.node.callspec.params["cluster"] != "sqlite":
        pytest.skip("uses no database: runs once, with the SQLite cluster")
    return cluster[0]


class Spy:
    """The cluster executor, keeping the handles of the jobs it started."""

    def __init__(self, executor):
        self.executor, self.name, self.jobs = executor, executor.name, []

    def start_job(self, *args):
        self.jobs.append(self.executor.start_job(*args))
        return self.jobs[-1]

    def capacity(self):
        return self.executor.capacity()


def _project(root: Path) -> int:
    init_db()
    folder = make_mvtec(root, n_train=8, n_test_good=4, n_defect=3, size=32)
    ds = load_folder(folder)
    with session_scope() as s:
        p = q.create_project(s, root.parent.name, "folder", root_path=str(folder))  # one database per module
        q.add_images(s, p.id, image_items(ds.records, ds.root))
        holes = [im.id for im in q.get_images(s, p.id) if im.defect_type == "hole"][:2]
        q.set_labels(s, holes, "anomaly", "hole", split="train")
        return p.id


def _enqueue(pid: int, **overrides) -> tuple[int, int]:
    ov = {**TINY, **overrides}
    payload = {"project_id": pid, "method": "devnet", "preset": "tiny", "overrides": ov, "protocol": PROTOCOL}
    with session_scope() as s:
        run = q.create_run(s, pid, "devnet", "tiny", ov, PROTOCOL, "app")
        return run.id, q.enqueue_job(s, "train", payload, run_id=run.id).id


def _job(job_id: int):
    with session_scope() as s:
        return q.get_job(s, job_id)


def _wait(pred, timeout: float, poll: float = 0.1):
    return wait_until(pred, timeout, poll)


def _worker_thread(executor) -> threading.Thread:
    t = threading.Thread(target=run_worker, kwargs={"once": True, "executor": executor, "poll_s": 0.2}, daemon=True)
    t.start()
    return t


def test_a_queued_job_runs_on_ray_and_the_results_page_shows_it(cluster_db, tmp_path):
    pid = _project(tmp_path / "parts")
    run_id, job_id = _enqueue(pid)
    spy = Spy(cluster_db)
    assert run_worker(once=True, executor=spy) == 0
    assert len(spy.jobs) == 1 and isinstance(spy.jobs[0], RayJob)
    assert ray.get(spy.jobs[0].ref) == 0  # the job process's exit code, returned by its Ray task
    job = _job(job_id)
    assert job.status == "done", job.error
    with session_scope() as s:
        run = q.get_run(s, run_id)
        assert run.status == "done" and Path(run.model_path).is_file()
        assert Path(run.model_path).parent == artefacts.model_path(os.environ["OSAD_DATA_DIR"], run_id).parent
        assert 0.0 <= q.run_metrics(s, run_id)["image_auroc"] <= 1.0
        assert len(q.run_scores(s, run_id)) == 8 + 4 + 6 and len(q.train_log(s, run_id)) >= 1

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=90)
    at.run()
    at.switch_page("pages/results.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics.get("Image AUROC") not in (None, "—")


def test_benchmark_on_ray_gives_the_local_aurocs(no_db_cluster, tmp_path):
    folder = make_mvtec(tmp_path / "bench", n_train=8, n_test_good=4, n_defect=3, size=32)
    args = ["benchmark", "--data", str(folder), "--methods", "devnet,dra", "--seeds", "0", "1", "--shots", "2",
            "--preset", "tiny", "--weights", "random", "--backbone", "resnet18", "--image-size", "32",
            "--epochs", "2", "--steps-per-epoch", "2", "--device", "cpu", "--no-db"]
    assert cli([*args, "--json", str(tmp_path / "local.json")]) == 0
    assert cli([*args, "--json", str(tmp_path / "ray.json"), "--ray", "local"]) == 0
    local, on_ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert [r["method"] for r in on_ray["rows"]] == ["devnet", "dra"]
    assert len(on_ray["runs"]) == 4
    for a, b in zip(local["rows"], on_ray["rows"]):
        assert len(b["aurocs"]) == 2
        assert b["aurocs"] == pytest.approx(a["aurocs"], abs=1e-6), (a["method"], a["aurocs"], b["aurocs"])


def test_score_on_ray_streams_every_image_in_order(no_db_cluster, tmp_path, capsys):
    folder = make_mvtec(tmp_path / "score", n_train=8, n_test_good=4, n_defect=3, size=32)
    model = tmp_path / "m.osad"
    assert cli(["train", "--data", str(folder), "--method", "devnet", "--preset", "tiny", "--shots", "2",
                "--weights", "random", "--backbone", "resnet18", "--image-size", "32", "--epochs", "1",
                "--steps-per-epoch", "2", "--device", "cpu", "--no-db", "--out", str(model)]) == 0
    images = str(folder / "test")
    assert cli(["score", "--model", str(model), images, "--csv", str(tmp_path / "local.csv"), "--device", "cpu"]) == 0
    assert cli(["score", "--model", str(model), images, "--csv", str(tmp_path / "ray.csv"), "--device", "cpu",
                "--ray", "local", "--batch", "3", "--threshold", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "images/s (ray executor)" in err and "10/10 images" in err
    local = [line.split(",") for line in (tmp_path / "local.csv").read_text().splitlines()[1:]]
    on_ray = [line.split(",") for line in (tmp_path / "ray.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in on_ray] == [r[0] for r in local] and len(on_ray) == 10
    assert [float(r[1]) for r in on_ray] == pytest.approx([float(r[1]) for r in local], abs=1e-5)
    assert {r[2] for r in on_ray} <= {"anomaly", "normal"}


def test_cancel_reaches_a_running_ray_task(cluster_db, tmp_path):
    pid = _project(tmp_path / "parts")
    run_id, job_id = _enqueue(pid, epochs=500)
    worker = _worker_thread(cluster_db)
    _wait(lambda: (_job(job_id).progress_json or {}).get("epoch") is not None, 120)  # training, on Ray
    t0 = time.monotonic()
    with session_scope() as s:
        q.request_cancel(s, job_id)
    job = _wait(lambda: (j := _job(job_id)).status != "running" and j, 60)
    print(f"cancelled after {time.monotonic() - t0:.1f} s")
    assert job.status == "cancelled", job.error
    assert "cancelled by the user" in job.error
    worker.join(30)
    assert not worker.is_alive()
    with session_scope() as s:
        assert q.get_run(s, run_id).status == "cancelled" and not q.run_metrics(s, run_id)


def _ray_job_pids(job_id: int) -> list[int]:
    """Ray names a worker process after the task it runs (``ray::osad-job-N``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(f"ray::osad-job-{job_id}".encode()):
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the Ray worker through /proc")
def test_a_killed_ray_worker_leaves_the_job_failed_never_lost(cluster_db, tmp_path):
    pid = _project(tmp_path / "parts")
    run_id, job_id = _enqueue(pid, epochs=500)
    worker = _worker_thread(cluster_db)
    _wait(lambda: (_job(job_id).progress_json or {}).get("epoch") is not None, 120)
    pids = _wait(lambda: _ray_job_pids(job_id), 10)
    os.kill(pids[0], signal.SIGKILL)
    job = _wait(lambda: (j := _job(job_id)).status != "running" and j, 60)
    assert job.status in ("failed", "queued"), job.status
    if job.status == "failed":
        assert "ended unexpectedly" in job.error and "Ray worker died" in job.error, job.error
    worker.join(30)
    with session_scope() as s:
        run = q.get_run(s, run_id)
        assert run.status == job.status and not q.run_metrics(s, run_id)
    assert not artefacts.model_path(os.environ["OSAD_DATA_DIR"], run_id).exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the Ray worker through /proc")
def test_a_cancel_the_task_cannot_answer_ends_it_through_ray_cancel(cluster_db, tmp_path, monkeypatch):
    monkeypatch.setenv("OSAD_JOB_CANCEL_GRACE_S", "2")
    pid = _project(tmp_path / "parts")
    run_id, job_id = _enqueue(pid, epochs=500)
    worker = _worker_thread(cluster_db)
    _wait(lambda: (_job(job_id).progress_json or {}).get("epoch") is not None, 120)
    task_pid = _wait(lambda: _ray_job_pids(job_id), 10)[0]
    os.kill(task_pid, signal.SIGSTOP)  # a hung step: the task never reads the cancel request
    with session_scope() as s:
        q.request_cancel(s, job_id)
    job = _wait(lambda: (j := _job(job_id)).status != "running" and j, 60)
    assert job.status == "cancelled" and "without reply" in job.error, job.error
    _wait(lambda: not Path(f"/proc/{task_pid}").exists() or b"zombie" in Path(f"/proc/{task_pid}/status").read_bytes(), 30)
    worker.join(30)
    assert not worker.is_alive()


def test_a_task_gets_the_job_id_and_never_the_database_url(cluster_db, monkeypatch):
    monkeypatch.setenv("OSAD_JOB_MAX_S", "120")
    env = task_env()["env_vars"]
    assert env["OSAD_JOB_MAX_S"] == "120" and str(REPO) in env["PYTHONPATH"]
    for secret in ("OSAD_DATABASE_URL", "OSAD_DATA_DIR", "OSAD_TEST_POSTGRES_URL", "OSAD_RAY_ADDRESS"):
        assert secret not in env
    assert os.environ["OSAD_DATABASE_URL"] not in json.dumps(task_env())


def test_a_ray_machine_without_a_database_url_fails_the_job_with_one_sentence(cluster_db, tmp_path, monkeypatch):
    """A machine whose ``ray start`` had no OSAD_DATABASE_URL (here: a task environment that
    blanks it) cannot reach the job row, so the worker fails the job with the reason."""
    pid = _project(tmp_path / "parts")
    run_id, job_id = _enqueue(pid)
    import osad_core.executors.ray as ray_executor

    blank = {"env_vars": {**task_env()["env_vars"], "OSAD_DATABASE_URL": ""}}
    monkeypatch.setattr(ray_executor, "task_env", lambda: blank)
    assert run_worker(once=True, executor=cluster_db) == 0
    job = _job(job_id)
    assert job.status == "failed"
    assert "has no OSAD_DATABASE_URL: set them in the environment `ray start` runs in" in job.error, job.error
    assert "Traceback" not in job.error and len(job.error.splitlines()) == 1
    with session_scope() as s:
        assert q.get_run(s, run_id).status == "failed"

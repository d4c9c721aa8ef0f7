"""The worker claims queued jobs, trains, stores results, and reports failures clearly."""
import pytest

from db import init_db, session_scope
from db import queries as q
from osad_core.data import load_folder
from osad_core.store import image_items
from osad_core.worker import run_worker

TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64}


@pytest.fixture(autouse=True)
def _database(db_url):
    """Every worker test runs on SQLite and on PostgreSQL (through OSAD_DATABASE_URL)."""


def _project(mvtec_dir, name="parts"):
    init_db()
    ds = load_folder(mvtec_dir)
    with session_scope() as s:
        p = q.create_project(s, name, "folder", root_path=str(mvtec_dir))
        q.add_images(s, p.id, image_items(ds.records, ds.root))
        return p.id


def _enqueue(pid, protocol, method="dra"):
    payload = {"project_id": pid, "method": method, "preset": "tiny", "overrides": TINY, "protocol": protocol}
    with session_scope() as s:
        run = q.create_run(s, pid, method, "tiny", TINY, protocol, "app")
        job = q.enqueue_job(s, "train", payload, run_id=run.id)
        return run.id, job.id


def test_worker_trains_a_project_and_stores_everything(mvtec_dir):
    pid = _project(mvtec_dir)
    with session_scope() as s:  # tag two anomalies in the train split, as an inspector would
        ims = [im for im in q.get_images(s, pid) if im.defect_type == "hole"][:2]
        q.set_labels(s, [im.id for im in ims], "anomaly", "hole", author="ana", split="train")
        # and leave three images unlabelled: they get scores too
        unl = [im for im in q.get_images(s, pid) if im.split == "train" and im.label == "normal"][:3]
        q.set_labels(s, [im.id for im in unl], "unlabeled", author="ana")
    run_id, job_id = _enqueue(pid, {"setting": "general", "shots": 2, "seed": 0})
    assert run_worker(once=True) == 0
    with session_scope() as s:
        job = q.get_job(s, job_id)
        assert job.status == "done", job.error
        run = q.get_run(s, run_id)
        assert run.status == "done" and run.model_path and run.weights.startswith("random")
        assert run.seen_defect_types == ["hole"] and run.n_train_anomaly == 2
        m = q.run_metrics(s, run_id)
        assert {"image_auroc", "image_auroc_seen", "image_auroc_unseen"} <= set(m)
        roles = {r["role"] for r in q.run_scores(s, run_id)}
        assert roles == {"train_normal", "train_anomaly", "calibration", "test", "scored"}
        assert all(r["tsne_x"] is not None for r in q.run_scores(s, run_id))
        assert job.progress_json.get("fraction") == 1.0
        assert len(q.train_log(s, run_id)) >= 2


def test_failed_job_says_why(mvtec_dir):
    pid = _project(mvtec_dir)
    with session_scope() as s:
        q.set_labels(s, [im.id for im in q.get_images(s, pid) if im.label == "normal"], "unlabeled")
    run_id, job_id = _enqueue(pid, {"setting": "general", "shots": 1, "seed": 0})
    run_worker(once=True)
    with session_scope() as s:
        job = q.get_job(s, job_id)
        assert job.status == "failed" and "no normal training images" in job.error
        assert q.get_run(s, run_id).status == "failed"


def test_cancel_requested_while_queued_is_never_run(mvtec_dir):
    pid = _project(mvtec_dir)
    run_id, job_id = _enqueue(pid, {"setting": "general", "shots": 1, "seed": 0})
    with session_scope() as s:
        assert q.request_cancel(s, job_id) == "cancelled"
    run_worker(once=True)
    with session_scope() as s:
        assert q.get_run(s, run_id).status == "cancelled"

"""Projects of many images, with a few hundred tiny ones: a resumable import in batches
(in the process and as the worker's ``import`` job), the Label page's queries and
counts, and streamed scoring that writes every row and honours a cancel.

Speed at 100,000 images is measured by ``scripts/bench_scale.py``, not here.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import db
from db import init_db, session_scope
from db import queries as q
from db.models import Image as ImageRow
from db.models import ImageScore, LabelEvent
from osad_core import store
from osad_core.data import load_folder
from osad_core.executors import LocalExecutor
from osad_core.folder_import import ImportCancelled, import_dataset

N = 240


def _flat_folder(root: Path, n: int = N, size: int = 12) -> Path:
    """``n`` tiny PNGs in two subfolders (a flat folder: all unlabelled), plus one
    file that is not an image and one truncated PNG (both skipped, named)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")
    (root / "a" / "notes.png").write_text("not an image")
    return root


def _stored(project_id: int) -> tuple[int, int, int]:
    """(images, distinct paths, label events) of the project."""
    with session_scope() as s:
        n = s.scalar(select(func.count(ImageRow.id)).where(ImageRow.project_id == project_id))
        paths = s.scalar(select(func.count(func.distinct(ImageRow.path))).where(ImageRow.project_id == project_id))
        events = s.scalar(select(func.count(LabelEvent.id)).where(LabelEvent.project_id == project_id))
    return n, paths, events


def test_an_interrupted_import_resumes_without_reading_stored_files_again(db_url, tmp_path, monkeypatch):
    init_db()
    ds = load_folder(_flat_folder(tmp_path / "many"))
    assert len(ds.records) == N + 1  # the text file named .png is listed, then refused when read
    with session_scope() as s:
        pid = q.create_project(s, "many", "folder", root_path=ds.root).id
    hashed: list[str] = []
    real_sha1 = store.file_sha1
    monkeypatch.setattr(store, "file_sha1", lambda p: hashed.append(p) or real_sha1(p))
    batches = iter(range(100))
    progress: list[dict] = []
    with pytest.raises(ImportCancelled, match="after 150 of 241 files"):
        import_dataset(pid, ds, batch=50, sink=progress.append, should_stop=lambda: next(batches) >= 3)
    assert _stored(pid) == (149, 149, 149)  # the text file was among the first 150
    assert progress[-1]["done"] == 150 and progress[-1]["total"] == N + 1 and progress[-1]["eta_s"] > 0
    first = set(hashed)
    hashed.clear()

    res = import_dataset(pid, ds, batch=50, sink=progress.append)
    assert (res.added, res.already, len(res.skipped)) == (N - 149, 149, 1)
    assert "notes.png" in res.skipped[0][1]
    assert _stored(pid) == (N, N, N)  # every image once, one import event each
    assert not first & set(hashed) and len(hashed) == N - 149  # the stored files were not read again
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["done"] == N + 1

    again = import_dataset(pid, ds, batch=50)
    assert (again.added, again.already) == (0, N) and _stored(pid) == (N, N, N)


def test_a_large_server_folder_is_imported_by_the_worker_as_a_job(db_url, tmp_path, monkeypatch):
    from osad_core.worker import run_worker
    from ui import ingest

    init_db()
    _flat_folder(tmp_path / "big", n=60)
    monkeypatch.setattr(ingest, "IN_PAGE_MAX", 20)
    created = ingest.create_from_folder(str(tmp_path / "big"), "big", author="alice")
    assert created.job_id is not None and created.images == 0
    assert created.notes == ["more than 20 images: importing them in the background"]
    with session_scope() as s:
        assert q.label_counts(s, created.project_id)["images"] == 0  # the page did not wait for the files
        assert ingest.resume_import(created.project_id, "alice") == created.job_id  # already queued: no second job
    assert run_worker(once=True, poll_s=0.1) == 0
    with session_scope() as s:
        job = q.get_job(s, created.job_id)
        assert job.status == "done", job.error
        p = job.progress_json
        assert p["done"] == p["total"] == 61 and p["fraction"] == 1.0 and "imported 60 of 61 files" in p["message"]
        assert p["skipped"] == 1
        assert q.label_counts(s, created.project_id)["unlabeled"] == 60
        assert q.latest_jobs(s, "import", "project_id")[created.project_id].id == created.job_id
        assert q.get_project(s, created.project_id).description.endswith(": 60 unlabelled images (flat folder)")
    _assert_thumbnails_ready(created.project_id, 60)


def _assert_thumbnails_ready(project_id: int, n: int) -> None:
    """Every image of the project has its grid thumbnail on disk before any page is
    drawn, and the Label grid's lookup finds that file instead of making it again."""
    from ui import thumbs

    with session_scope() as s:
        ims = q.get_images(s, project_id)
    files = [thumbs.thumb_path(im.path, im.content_hash) for im in ims]
    assert len(files) == n and all(f.is_file() for f in files)
    assert {Image.open(f).size for f in files} == {(12, 12)}  # no larger than the image itself
    before = files[0].stat().st_mtime_ns
    assert thumbs.thumbnail(ims[0].path, ims[0].content_hash) == files[0]
    assert files[0].stat().st_mtime_ns == before


def test_a_small_server_folder_is_still_read_while_the_page_waits(tmp_path):
    from ui import ingest

    init_db()
    _flat_folder(tmp_path / "small", n=10)
    created = ingest.create_from_folder(str(tmp_path / "small"), "small")
    assert created.job_id is None and created.images == 10
    _assert_thumbnails_ready(created.project_id, 10)


def _labelled_project(tmp_path) -> tuple[int, int, dict[int, tuple[str, str | None, str, str, float]]]:
    """A project of N images with mixed labels, types and splits, and a run that scored
    all but every 7th image. Returns (project id, run id, {image id: (label, type, split, name, score)})."""
    init_db()
    rng = np.random.default_rng(1)
    items = []
    for i in range(N):
        label = ("normal", "anomaly", "unlabeled")[i % 3]
        items.append({"path": str(tmp_path / f"x{i:04d}.png"), "rel_path": f"{(i * 37) % N:04d}.png",
                      "label": label, "defect_type": ("crack", "hole")[i % 2] if label == "anomaly" else None,
                      "split": "test" if i % 5 == 0 else "train"})
    with session_scope() as s:
        pid = q.create_project(s, "grid", "cli").id
        q.add_images(s, pid, items)
        run = q.create_run(s, pid, "devnet", "tiny", {}, {}, "cli")
        run.threshold = 0.5
        rid = run.id
        images = q.get_images(s, pid)
        scores = {im.id: float(rng.random()) for k, im in enumerate(images) if k % 7}
        s.add_all(ImageScore(run_id=rid, image_id=i, score=sc, role="scored", label_at_run="unlabeled")
                  for i, sc in scores.items())
    truth = {im.id: (im.label, im.defect_type, im.split, im.rel_path, scores.get(im.id)) for im in images}
    return pid, rid, truth


def test_label_queries_return_the_right_page_order_and_counts(db_url, tmp_path):
    pid, rid, truth = _labelled_project(tmp_path)
    with session_scope() as s:
        # unlabelled images by name, third page of 20
        rows, total = q.image_page(s, pid, label="unlabeled", sort="name", offset=40, limit=20)
        want = sorted((t[3], i) for i, t in truth.items() if t[0] == "unlabeled")
        assert total == len(want) and [r.image.id for r in rows] == [i for _, i in want[40:60]]
        # held-out anomalies of one type by score, highest first; unscored images last
        rows, total = q.image_page(s, pid, label="anomaly", defect_type="crack", split="test",
                                   score_run_id=rid, sort="score_desc", limit=100)
        want = [i for i, t in truth.items() if t[0] == "anomaly" and t[1] == "crack" and t[2] == "test"]
        key = {i: (truth[i][4] is None, -(truth[i][4] or 0), i) for i in want}
        assert total == len(want) > 0 and [r.image.id for r in rows] == sorted(want, key=key.get)
        # most uncertain first inside a score range
        rows, total = q.image_page(s, pid, score_run_id=rid, sort="uncertain", score_min=0.2, score_max=0.9,
                                   offset=5, limit=10)
        want = sorted((abs(t[4] - 0.5), i) for i, t in truth.items() if t[4] is not None and 0.2 <= t[4] <= 0.9)
        assert total == len(want) and [r.image.id for r in rows] == [i for _, i in want[5:15]]
        # the last, partial page
        rows, total = q.image_page(s, pid, split="train", sort="name", offset=180, limit=48)
        assert total == sum(t[2] == "train" for t in truth.values()) == 192 and len(rows) == 12

        c = q.label_counts(s, pid)
        assert (c["images"], c["normal"], c["anomaly"], c["unlabeled"]) == (N, 80, 80, 80)
        assert c["anomaly_by_type"] == {"crack": 40, "hole": 40}  # i % 3 == 1 alternates parity
        assert c["by_split"]["test"]["anomaly"] == sum(t[0] == "anomaly" and t[2] == "test" for t in truth.values())
        listed = {p["id"]: p for p in q.list_projects(s)}
        assert listed[pid]["images"] == N and listed[pid]["by_split"] == c["by_split"]
        assert q.defect_types(s, pid) == ["crack", "hole"]
        scored = [t[4] for t in truth.values() if t[4] is not None]
        assert q.score_range(s, rid) == pytest.approx((min(scored), max(scored)))
        assert q.known_paths(s, pid, [str(tmp_path / "x0003.png"), "/elsewhere.png"]) == {str(tmp_path / "x0003.png")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from conftest import make_mvtec

    from osad_core.cli import main

    folder = make_mvtec(tmp_path_factory.mktemp("train") / "parts", n_train=8, n_test_good=3, n_defect=3, size=32)
    model = folder.parent / "m.osad"
    assert main(["train", "--data", str(folder), "--method", "devnet", "--preset", "tiny", "--shots", "2",
                 "--weights", "random", "--backbone", "resnet18", "--image-size", "32", "--epochs", "1",
                 "--steps-per-epoch", "1", "--device", "cpu", "--no-db", "--out", str(model)]) == 0
    return model


def test_streamed_scoring_writes_every_row_in_order_and_honours_cancel(tiny_model, tmp_path, capsys):
    from osad_core.bulk_score import score_paths
    from osad_core.methods.base import load_detector

    folder = _flat_folder(tmp_path / "new", n=50, size=20)
    paths = sorted(str(p) for p in folder.rglob("*.png"))  # 50 images and the refused text file
    progress: list[dict] = []
    out = tmp_path / "all.csv"
    res = score_paths(LocalExecutor(), tiny_model, paths, str(out), threshold=0.0, device="cpu", batch=8,
                      echo=False, sink=progress.append)
    rows = list(csv.DictReader(out.open()))
    good = [p for p in paths if not p.endswith("notes.png")]
    assert [r["path"] for r in rows] == good and res["scored"] == 50 and res["skipped"] == 1
    ref = load_detector(tiny_model, "cpu").predict(good)
    np.testing.assert_allclose([float(r["score"]) for r in rows], ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["scores"], ref.scores, rtol=1e-5, atol=1e-6)
    assert progress[-1]["done"] == 51 and progress[-1]["fraction"] == 1.0 and res["peak_rss_mb"] > 0

    asked = []
    part = tmp_path / "part.csv"
    res = score_paths(LocalExecutor(), tiny_model, paths, str(part), device="cpu", batch=8, echo=False,
                      sink=progress.append, should_stop=lambda: asked.append(1) or len(asked) >= 2)
    assert res["cancelled"] and res["scored"] == 16 and len(part.read_text().splitlines()) == 1 + 16
    assert "cancelled after scoring 16/51 images" in capsys.readouterr().err


def test_score_command_streams_and_says_its_peak_memory(tiny_model, tmp_path, capsys):
    from osad_core.cli import main

    folder = _flat_folder(tmp_path / "cli", n=30, size=20)
    assert main(["score", "--model", str(tiny_model), str(folder), "--csv", str(tmp_path / "s.csv"),
                 "--batch", "7", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.strip().splitlines()) == 30 and len((tmp_path / "s.csv").read_text().splitlines()) == 31
    assert "scored 30/31 images" in cap.err and "peak memory" in cap.err and "notes.png" in cap.err


def test_import_command_resumes(tmp_path, capsys):
    from osad_core.cli import main

    folder = _flat_folder(tmp_path / "cmd", n=30)
    assert main(["import", str(folder), "--project", "cmd", "--batch", "8"]) == 0
    assert "imported 30 of 31 files" in capsys.readouterr().err
    assert main(["import", str(folder), "--project", "cmd"]) == 0
    assert "30 were already in the project" in capsys.readouterr().err
    with session_scope() as s:
        assert q.label_counts(s, q.get_project_by_name(s, "cmd").id)["images"] == 30


def test_a_large_run_leaves_the_planner_knowing_its_scores(db_url):
    """PostgreSQL plans with a table's size at its last ANALYZE: after a first run's
    1,000 scores it must know them (a nested loop over "one row" took minutes at 100k)."""
    from sqlalchemy import text

    init_db()
    with session_scope() as s:
        pid = q.create_project(s, "big run", "cli").id
        q.add_images(s, pid, [{"path": f"/nowhere/{i:04d}.png"} for i in range(1000)])
        rid = q.create_run(s, pid, "devnet", "tiny", {}, {}, "cli").id
        ids = [im.id for im in q.get_images(s, pid)]
        scores = np.random.default_rng(0).random(len(ids))
        q.write_run_results(s, rid, {ImageScore: [{"image_id": i, "score": float(v), "role": "scored",
                                                   "label_at_run": "unlabeled"} for i, v in zip(ids, scores)]})
    with session_scope() as s:
        rows, total = q.image_page(s, pid, score_run_id=rid, sort="score_desc", limit=5)
        assert total == 1000 and [r.score for r in rows] == pytest.approx(sorted(scores, reverse=True)[:5])
        if s.get_bind().dialect.name == "postgresql":
            known = s.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'image_scores'"))
            assert known >= 1000
            assert s.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'images'")) >= 1000


def test_a_server_folder_is_scored_by_the_worker_with_progress_and_a_csv(db_url, tiny_model, tmp_path):
    from osad_core.bulk_score import scores_csv
    from osad_core.worker import run_worker
    from ui import ingest

    init_db()
    folder = _flat_folder(tmp_path / "line", n=40, size=20)
    with session_scope() as s:
        pid = q.create_project(s, "line", "cli").id
        run = q.create_run(s, pid, "devnet", "tiny", {}, {}, "cli")
        run.model_path, run.threshold = str(tiny_model), -1e9
    with pytest.raises(ValueError, match="cannot be imported"):
        ingest.queue_folder_scoring(run, "/etc", "alice")  # outside the import roots
    job_id = ingest.queue_folder_scoring(run, str(folder), "alice")
    assert run_worker(once=True, poll_s=0.1) == 0
    with session_scope() as s:
        job = q.get_job(s, job_id)
        assert job.status == "done", job.error
        p = job.progress_json
        assert p["done"] == p["total"] == 41 and p["fraction"] == 1.0 and p["scored"] == 40 and p["skipped"] == 1
        assert q.latest_jobs(s, "score", "run_id")[run.id].id == job_id
    rows = list(csv.DictReader(scores_csv(db.data_dir(), job_id).open()))
    assert len(rows) == 40 and {r["verdict"] for r in rows} == {"anomaly"}  # every score is above that threshold

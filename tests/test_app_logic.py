"""The app's helpers without a browser: project creation, thumbnails, figures, training
requests, and the ``set_split`` label batch."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_mvtec


@pytest.fixture
def database(db_url):
    """The app's database, migrated as at the app's start; once per backend."""
    import db

    db.init_db()
    return db_url


def png(color=100, size=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- ingest ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_zip_in_mvtec_layout_keeps_its_labels(tmp_path):
    from db import session_scope
    from db import queries as q
    from ui import ingest

    src = make_mvtec(tmp_path / "bottle", n_train=3, n_test_good=2, n_defect=2)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        for p in src.rglob("*.png"):
            zf.write(p, "bottle/" + str(p.relative_to(src)))
    c = ingest.create_from_uploads([("bottle.zip", zbuf.getvalue())], "bottle")
    assert c.images == 9 and "MVTec layout" in c.notes[0]
    with session_scope() as s:
        counts = q.label_counts(s, c.project_id)
    assert counts["by_split"]["train"]["normal"] == 3 and counts["anomaly_by_type"] == {"hole": 2, "scratch": 2}


@pytest.mark.usefixtures("database")
def test_upload_skips_broken_images_and_duplicate_names_are_kept_apart():
    from ui import ingest

    c = ingest.create_from_uploads([("a.png", png()), ("broken.png", b"\x89PNG not really")], "x")
    assert c.images == 1 and "`broken.png` is not a readable image" in c.notes[-1]
    assert sorted(p.name for p in (ingest.uploads_dir()).rglob("*.png")) == ["a.png"]  # refused file removed
    with pytest.raises(ingest.IngestError, match="`broken.png` is not a readable image.*nothing was created"):
        ingest.create_from_uploads([("broken.png", b"\x89PNG not really")], "y")
    with pytest.raises(ingest.IngestError, match="not a readable zip"):
        ingest.create_from_uploads([("a.zip", b"PK nope")], "z")
    with pytest.raises(ingest.IngestError, match="Give the project a name"):
        ingest.create_from_uploads([("a.png", png())], "  ")
    c = ingest.create_from_uploads([("a.png", png(1)), ("a.png", png(2))], "dups")
    assert c.images == 2


@pytest.mark.usefixtures("database")
def test_duplicate_project_name_is_refused(tmp_path):
    from ui import ingest

    parts = make_mvtec(tmp_path / "parts", n_train=2, n_test_good=1, n_defect=1)
    ingest.create_from_folder(str(parts))
    with pytest.raises(ingest.IngestError, match="already exists"):
        ingest.create_from_folder(str(parts))


@pytest.mark.usefixtures("database")
def test_delete_removes_uploads_and_models_but_never_server_images(tmp_path):
    from db import data_dir, session_scope
    from db import queries as q
    from ui import ingest

    c = ingest.create_from_uploads([("a.png", png())], "up")
    with session_scope() as s:
        folder = Path(q.get_project(s, c.project_id).root_path)
        model = data_dir() / "models" / "run_1.pt"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(b"m")
        run = q.create_run(s, c.project_id, "dra", "tiny", {}, {}, "app", status="done", model_path=str(model))
        assert run.id
        # a finished folder-scoring job left its CSV; a queued one is still waiting
        done = q.enqueue_job(s, "score", {"run_id": run.id, "folder": "x"})
        waiting = q.enqueue_job(s, "score", {"run_id": run.id, "folder": "y"})
        other = q.enqueue_job(s, "score", {"run_id": run.id + 1000, "folder": "z"})  # another project's run
        done.status = "done"
        ids = (done.id, waiting.id, other.id)
    from osad_core.bulk_score import scores_csv

    for job_id in ids:
        scores_csv(data_dir(), job_id).parent.mkdir(parents=True, exist_ok=True)
        scores_csv(data_dir(), job_id).write_text("path,score\n")
    assert folder.is_dir()
    assert ingest.delete_project(c.project_id) == "up"
    assert not folder.exists() and not model.exists()
    assert not scores_csv(data_dir(), ids[0]).exists() and not scores_csv(data_dir(), ids[1]).exists()
    assert scores_csv(data_dir(), ids[2]).exists()  # not this project's
    with session_scope() as s:
        assert q.get_job(s, ids[1]).status == "cancelled" and q.get_job(s, ids[2]).status == "queued"

    parts = make_mvtec(tmp_path / "parts", n_train=2, n_test_good=1, n_defect=1)
    files = sorted(parts.rglob("*"))
    c2 = ingest.create_from_folder(str(parts), "server")
    ingest.delete_project(c2.project_id)
    assert sorted(parts.rglob("*")) == files


@pytest.mark.usefixtures("database")
def test_scored_image_is_kept_checked_added_once_and_deleted_with_the_project(tmp_path):
    from db import session_scope
    from db import queries as q
    from ui import ingest

    c = ingest.create_from_uploads([("a.png", png())], "up")
    with ingest.scoring_folder() as folder:
        good, bad = folder / "new.png", folder / "fake.png"
        good.write_bytes(png(30))
        bad.write_bytes(b"\x89PNG not really")
        kept, digest = ingest.keep_scored(str(good), c.project_id)
        assert ingest.keep_scored(str(good), c.project_id) == (kept, digest)  # one copy per content
        with pytest.raises(ValueError, match="not a readable image"):
            ingest.keep_scored(str(bad), c.project_id)
    assert Path(kept).is_file() and Path(kept).parent == ingest.inspected_dir(c.project_id)
    assert [p.name for p in ingest.inspected_dir(c.project_id).iterdir()] == [Path(kept).name]
    with pytest.raises(ValueError, match="defect type"):
        ingest.add_scored(c.project_id, kept, digest, "new.png", "anomaly", " ", "dana")
    with pytest.raises(ValueError, match="no longer kept"):  # only the project's own kept files
        ingest.add_scored(c.project_id, str(tmp_path / "x.png"), digest, "x.png", "normal", None, "dana")
    assert "as normal" in ingest.add_scored(c.project_id, kept, digest, "new.png", "normal", None, "dana")
    assert "already holds this image" in ingest.add_scored(c.project_id, kept, digest, "n.png", "normal", None, "x")
    # the same content as an image the project had from the start is not added either
    with session_scope() as s:
        first = q.get_images(s, c.project_id)[0]
        assert q.label_counts(s, c.project_id)["images"] == 2
    msg = ingest.add_scored(c.project_id, kept, first.content_hash, "a.png", "normal", None, "x")
    assert "`a.png` already holds this image" in msg
    # a kept copy that never joined is swept once old; added ones stay
    with ingest.scoring_folder() as folder:
        (folder / "other.png").write_bytes(png(60))
        stale, _ = ingest.keep_scored(str(folder / "other.png"), c.project_id)
    os.utime(stale, (0, 0))
    os.utime(kept, (0, 0))
    assert ingest.sweep_inspected(c.project_id) == 1 and Path(kept).exists() and not Path(stale).exists()
    from ui import masks

    drawn = masks.save(c.project_id, first.id, np.ones((4, 4), bool))
    ingest.delete_project(c.project_id)
    assert not ingest.inspected_dir(c.project_id).exists() and not Path(drawn).exists()


# --- thumbnails -----------------------------------------------------------------------------


def test_thumbnails_are_made_once_and_keyed_by_content(tmp_path):
    from db import data_dir
    from ui import thumbs

    img = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 400, 3), np.uint8)).save(img)
    t = thumbs.thumbnail(str(img), "abc123")
    assert t is not None and data_dir() / "thumbs" in t.parents and t.name == "abc123_192.jpg"
    assert max(Image.open(t).size) == 192
    mtime = t.stat().st_mtime_ns
    os.utime(img)  # even a touched source keeps its cached thumbnail (same content hash)
    assert thumbs.thumbnail(str(img), "abc123").stat().st_mtime_ns == mtime
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert thumbs.thumbnail(str(tmp_path / "bad.png"), "bad") is None
    assert thumbs.view_image(str(img), 128).shape == (128, 85, 3)


# --- figures --------------------------------------------------------------------------------


def test_threshold_sentence_speaks_in_counts():
    from ui import figures

    df = pd.DataFrame({"score": [0.1, 0.2, 0.9, 0.3, 0.8], "label_at_run": ["normal"] * 3 + ["anomaly"] * 2})
    c = figures.threshold_counts(df, 0.5)
    assert c == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}
    assert figures.threshold_sentence(c) == (
        "At this threshold **1 of 3** good images is rejected and **1 of 2** defects is missed.")
    c2 = figures.threshold_counts(df, 0.05)
    assert figures.threshold_sentence(c2) == (
        "At this threshold **3 of 3** good images are rejected and **0 of 2** defects are missed.")


def test_scores_frame_marks_seen_and_unseen_types():
    from ui import figures

    rows = [
        {"image_id": 1, "rel_path": "a", "score": 0.1, "role": "test", "label_at_run": "normal",
         "defect_type_at_run": None, "seen": None, "tsne_x": 0.0, "tsne_y": 1.0},
        {"image_id": 2, "rel_path": "b", "score": 0.9, "role": "test", "label_at_run": "anomaly",
         "defect_type_at_run": "hole", "seen": True, "tsne_x": 1.0, "tsne_y": 0.0},
        {"image_id": 3, "rel_path": "c", "score": 0.7, "role": "test", "label_at_run": "anomaly",
         "defect_type_at_run": "scratch", "seen": False, "tsne_x": 2.0, "tsne_y": 0.5},
        {"image_id": 4, "rel_path": "d", "score": 0.4, "role": "scored", "label_at_run": "unlabeled",
         "defect_type_at_run": None, "seen": None, "tsne_x": None, "tsne_y": None},
    ]
    df = figures.scores_frame(rows)
    assert list(df["group"]) == ["normal", "anomaly · seen type", "anomaly · unseen type", "unlabelled"]
    assert list(figures.evaluation_frame(df)["image_id"]) == [1, 2, 3]
    fig = figures.tsne_figure(df, "seen / unseen defect type")
    ids = sorted(int(cd[0]) for tr in fig.data for cd in tr.customdata)
    assert ids == [1, 2, 3]  # the point without coordinates is left out; every point knows its image


def test_tsne_figure_stays_legible_and_reachable_at_ten_thousand_points():
    from ui import figures

    rng = np.random.default_rng(0)
    n = 10_000
    rows = [{"image_id": i, "rel_path": f"p/{i}.png", "score": float(rng.random()),
             "role": "scored" if i % 3 else "train_normal",
             "label_at_run": "anomaly" if i % 500 == 0 else ("unlabeled" if i % 3 else "normal"),
             "defect_type_at_run": "hole" if i % 500 == 0 else None, "seen": True if i % 500 == 0 else None,
             "tsne_x": float(rng.normal()), "tsne_y": float(rng.normal())} for i in range(n)]
    fig = figures.tsne_figure(figures.scores_frame(rows), "seen / unseen defect type")
    density, *points = fig.data
    assert density.type == "contour" and density.hoverinfo == "skip"  # underneath, not pickable
    assert density.z.shape == (figures.DENSITY_BINS, figures.DENSITY_BINS)  # a grid is sent, not the points
    assert density.name == "density of all 10,000 points"
    assert {t.type for t in points} == {"scattergl"} and {t.marker.size for t in points} == {5}
    assert not any(t.marker.symbol.endswith("open") for t in points)  # open symbols vanish when small
    ids = sorted(int(cd[0]) for t in points for cd in t.customdata)
    assert ids == list(range(n))  # every image is a point one can click or lasso
    assert points[-1].name.startswith("anomaly")  # the few anomalies are drawn last, on top
    assert "10,000 images" in fig.layout.title.text
    # a sample drawn over the density of all points, with a found image starred on top
    frame = figures.scores_frame(rows)
    grid = figures.density_grid(rng.normal(size=30_000), rng.normal(size=30_000))
    sampled = figures.tsne_figure(frame, density=grid, total=30_000, highlight=frame[frame["image_id"] == 42])
    assert sampled.layout.title.text == "t-SNE map · a sample of 10,000 of 30,000 images, over the density of all"
    assert sampled.data[0].name == "density of all 30,000 points" and sampled.data[0].z.sum() == 30_000
    assert sampled.data[-1].type == "scattergl" and sampled.data[-1].marker.symbol == "star"
    assert int(sampled.data[-1].customdata[0][0]) == 42  # clicking the star picks that image
    small = figures.tsne_figure(figures.scores_frame(rows[:50]))
    assert all(t.type == "scatter" for t in small.data) and small.data[0].marker.size == 8


def test_shift_click_selects_from_the_last_tick_to_the_clicked_image():
    from ui.label_grid import shift_range

    page = [11, 12, 13, 14, 15, 16]
    assert shift_range(page, [12], 15) == [12, 13, 14, 15]
    assert shift_range(page, [15, 12], 14) == [12, 13, 14]  # from the last tick, upwards too
    assert shift_range(page, [16, 99], 13) == [13, 14, 15, 16]  # a tick on another page is no anchor
    assert shift_range(page, [], 13) == [13]  # nothing ticked yet: the image alone
    assert shift_range(page, [13], 13) == [13]
    assert shift_range(page, [12], 42) == []  # not on this page


def test_tsne_2d_keeps_clusters_apart_and_repeats_with_its_seed():
    from osad_core.evaluate import tsne_2d

    rng = np.random.default_rng(0)
    lab = np.repeat([0, 1, 2], 40)
    x = (rng.normal(0, 1, (3, 64))[lab] * 4 + rng.normal(0, 1, (120, 64))).astype(np.float32)
    y = tsne_2d(x, seed=3)
    assert y.shape == (120, 2) and np.isfinite(y).all()
    np.testing.assert_allclose(y, tsne_2d(x, seed=3), atol=1e-4)
    centres = np.stack([y[lab == k].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(y[lab == k] - centres[k], axis=1).mean() for k in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread
    assert tsne_2d(x[:4]) is None and tsne_2d(x[:6]).shape == (6, 2)


def test_overlay_uses_the_fixed_range_and_has_a_colour_bar():
    from ui import figures

    fig = figures.overlay_figure(np.zeros((40, 60, 3), np.uint8), np.random.rand(8, 8).astype(np.float32),
                                 0.0, 2.5, opacity=0.3)
    img, hm = fig.data
    assert img.type == "image" and img.source.startswith("data:image/png;base64,")
    assert (hm.zmin, hm.zmax, hm.opacity) == (0.0, 2.5, 0.3) and hm.colorbar.title.text == "anomaly"
    assert hm.dx == pytest.approx(60 / 8) and hm.dy == pytest.approx(40 / 8)


# --- training requests ----------------------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_train_request_payload_is_what_the_worker_reads(tmp_path):
    from osad_core.protocol import Protocol
    from ui import ingest, training

    c = ingest.create_from_folder(str(make_mvtec(tmp_path / "p", n_train=3, n_test_good=2, n_defect=2)))
    req = training.TrainRequest(c.project_id, "dra", "tiny", seed=7, device="cpu", setting="hard", shots=1,
                                known_class="hole")
    p = req.payload()
    assert p["overrides"] == {"device": "cpu"} and Protocol(**p["protocol"]).known_class == "hole"
    summary, warnings = training.check(req)
    assert "train 3 normal + 1 anomalies (hole)" in summary
    assert training.TrainRequest(c.project_id, "dra", "tiny").payload()["overrides"] == {}
    lite2 = training.TrainRequest(c.project_id, "fusion", "tiny", device="cpu", backbone="efficientnet_lite2")
    assert lite2.payload()["overrides"] == {"device": "cpu", "backbone": "efficientnet_lite2"}
    assert "auto" in training.backbone_choices()
    av = training.availability(c.project_id)
    assert (av.normal_train, av.normal_test, av.n_tagged, av.n_held_out) == (3, 2, 0, 4)
    assert av.default_shots() == 4


@pytest.mark.usefixtures("database")
def test_check_refuses_impossible_requests(tmp_path):
    from osad_core.data import DataError
    from ui import ingest, training

    c = ingest.create_from_folder(str(make_mvtec(tmp_path / "p", n_train=3, n_test_good=2, n_defect=2)))
    with pytest.raises(DataError, match="fewer than the 9 labelled anomalies"):
        training.check(training.TrainRequest(c.project_id, "dra", "tiny", shots=9))
    with pytest.raises(DataError, match="no preset"):
        training.check(training.TrainRequest(c.project_id, "dra", "huge"))
    with pytest.raises(DataError, match="Unknown method"):
        training.check(training.TrainRequest(c.project_id, "nope", "tiny"))


@pytest.mark.usefixtures("database")
def test_retrain_of_a_cli_run_uses_its_stored_protocol(tmp_path):
    from db import session_scope
    from db import queries as q
    from ui import ingest, training

    c = ingest.create_from_folder(str(make_mvtec(tmp_path / "p", n_train=3, n_test_good=2, n_defect=2)))
    with session_scope() as s:
        run = q.create_run(s, c.project_id, "devnet", "quick", {}, {"setting": "general", "shots": 3, "seed": 5},
                           "cli", status="done")
        run_id = run.id
    req = training.request_for_run(run_id)
    assert (req.method, req.preset, req.shots, req.seed, req.device) == ("devnet", "quick", 3, 5, "auto")


# --- the label batch added for the app ------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_set_split_is_one_undoable_batch_that_keeps_labels(tmp_path):
    from db import session_scope
    from db import queries as q
    from ui import ingest

    c = ingest.create_from_folder(str(make_mvtec(tmp_path / "p", n_train=2, n_test_good=1, n_defect=1)))
    with session_scope() as s:
        ims = q.get_images(s, c.project_id)
        mixed = [im.id for im in ims if im.split == "test"]  # a normal and two anomalies of two types
        before = {im.id: (im.label, im.defect_type) for im in ims}
        q.set_split(s, mixed, "train", author="ann")
    with session_scope() as s:
        after = {im.id: (im.label, im.defect_type, im.split) for im in q.get_images(s, c.project_id, mixed)}
        assert all(v[2] == "train" and v[:2] == before[k] for k, v in after.items())
        assert q.label_history(s, project_id=c.project_id, limit=1)[0]["author"] == "ann"
        assert q.undo_last(s, c.project_id, author="ann") == len(mixed)
    with session_scope() as s:
        assert {im.split for im in q.get_images(s, c.project_id, mixed)} == {"test"}
    with session_scope() as s, pytest.raises(ValueError, match="no images selected"):
        q.set_split(s, [], "test")


# --- defect masks ---------------------------------------------------------------------------


def test_canvas_strokes_paint_and_erase_a_mask_at_image_size(tmp_path):
    from ui import masks

    mask = np.zeros((20, 40), bool)
    mask[:, :5] = True  # an imported mask: the left edge
    canvas = np.zeros((100, 200, 4), np.uint8)  # drawn at 5× the image size
    canvas[50:, 100:] = (*masks.PAINT, 190)  # bottom-right quarter painted
    canvas[:, :10] = (*masks.ERASE, 190)  # the first 2 image columns erased
    out = masks.apply_strokes(mask, canvas)
    assert out.shape == (20, 40)
    assert out[10:, 20:].all() and not out[:10, 20:].any()
    assert not out[:, :2].any() and out[:, 2:5].all()
    assert (masks.apply_strokes(mask, None) == mask).all()
    path = masks.save(3, 7, out)
    assert Path(path).parent == masks.masks_dir(3) and Path(path).name.startswith("7-")
    assert (masks.load(path, (20, 40)) == out).all()
    half = masks.load(path, (10, 20))  # scaled to another size: nearest, still 0/1
    assert half.shape == (10, 20) and abs(half.mean() - out.mean()) < 0.05
    assert not masks.load(None, (4, 4)).any()
    assert masks.resize(out, (40, 80)).shape == (40, 80) and masks.resize(out, (40, 80))[::2, ::2].sum() == out.sum()
    tinted = np.asarray(masks.overlay(np.full((20, 40, 3), 100, np.uint8), out))
    assert tinted[15, 30, 0] > 100 and tinted[0, 30, 0] == 100
    with pytest.raises(ValueError, match="not a readable image"):
        (tmp_path / "bad.png").write_bytes(b"nope")
        masks.load(str(tmp_path / "bad.png"), (4, 4))


def test_the_projects_page_path_imports_no_torch_or_scikit_learn():
    """The first paint waits for what app.py and the Projects page import at the top;
    torch (the sidebar's compute and weights, after the page) and scikit-learn (a project
    being made) load later, inside the functions that use them."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "import streamlit, db, ui.auth, ui.common, ui.sidebar\n"  # app.py
            "import osad_core.data, ui.fmt, ui.ingest, ui.training\n"  # pages/projects.py
            "heavy = sorted({'torch', 'torchvision', 'sklearn', 'scipy', 'onnxruntime', 'alembic'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_every_stored_metric_has_a_name_for_people():
    from osad_core.evaluate import METRIC_DETAILS
    from ui import fmt

    assert fmt.metric_name("head_anomaly_image_auroc") == "Image AUROC · anomaly head alone"
    assert fmt.metric_name("salient_fraction") == "Mean salient fraction of the pseudo anomalies"
    assert [k for k in METRIC_DETAILS if fmt.metric_name(k) == k] == []  # none left as a raw key

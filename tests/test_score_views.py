"""The reads behind Results, Inspect and “Label next” (``db.score_views``) give the same
numbers as computing them from every score of the run, on SQLite and PostgreSQL.

A few hundred rows here; their speed at 100,000 images is measured by
``scripts/bench_scale.py``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from db import init_db, session_scope
from db import queries as q
from db import score_views as sv
from db.heatmaps import encode_vector
from db.models import Embedding, ImageScore
from osad_core import active
from ui import figures, label_next

N = 300
ROLES = ("test", "calibration", "train_normal", "train_anomaly", "scored")


@pytest.fixture
def run(db_url, tmp_path) -> SimpleNamespace:
    """A project of N images and a run that scored every one of them: mixed roles, labels,
    seen / unseen types, tied scores, t-SNE coordinates for most, an 8-D embedding each."""
    init_db()
    rng = np.random.default_rng(3)
    items = []
    for i in range(N):
        label = ("normal", "anomaly", "unlabeled")[i % 3]
        items.append({"path": str(tmp_path / f"x{i:04d}.png"), "rel_path": f"part_{(i * 37) % N:04d}.png",
                      "label": label, "defect_type": ("crack", "hole")[i % 2] if label == "anomaly" else None,
                      "split": "test" if i % 4 == 0 else "train"})
    with session_scope() as s:
        pid = q.create_project(s, "views", "cli").id
        q.add_images(s, pid, items)
        r = q.create_run(s, pid, "devnet", "tiny", {}, {}, "cli")
        r.threshold = 0.5
        rid = r.id
        images = q.get_images(s, pid)
        for k, im in enumerate(images):
            score = round(float(rng.random()), 2)  # two decimals: many ties
            role = ROLES[k % len(ROLES)]
            at_run = {"test": im.label, "calibration": "normal", "train_normal": "normal",
                      "train_anomaly": "anomaly", "scored": "unlabeled"}[role]
            s.add(ImageScore(run_id=rid, image_id=im.id, score=score, role=role, label_at_run=at_run,
                             defect_type_at_run=im.defect_type if at_run == "anomaly" else None,
                             seen=(im.defect_type == "crack") if at_run == "anomaly" else None,
                             tsne_x=None if k % 10 == 9 else float(rng.normal()),
                             tsne_y=None if k % 10 == 9 else float(rng.normal())))
            s.add(Embedding(run_id=rid, image_id=im.id, vector=encode_vector(rng.normal(size=8)), dim=8))
    return SimpleNamespace(id=rid, project_id=pid, threshold=0.5)


def _all(run_id: int) -> pd.DataFrame:
    with session_scope() as s:
        return figures.scores_frame(q.run_scores(s, run_id))


def test_counts_confusion_and_histogram_are_exact(run):
    df = _all(run.id)
    ev = figures.evaluation_frame(df)
    assert len(ev) > 20 and set(ev["label_at_run"]) == {"normal", "anomaly"}
    with session_scope() as s:
        assert sv.role_counts(s, run.id) == df["role"].value_counts().to_dict()
        assert sorted(sv.role_scores(s, run.id, "calibration")) == sorted(df.loc[df["role"] == "calibration", "score"])
        groups = sv.evaluation_groups(s, run.id, 0.5)
        lo, hi = min(g["min"] for g in groups), max(g["max"] for g in groups)
        bins = sv.evaluation_histogram(s, run.id, lo, hi, 10)
    assert sum(g["n"] for g in groups) == len(ev) and (lo, hi) == (ev["score"].min(), ev["score"].max())
    assert sv.confusion_counts(groups) == figures.threshold_counts(ev, 0.5)
    crack = [g for g in groups if g["defect_type_at_run"] == "crack"]
    assert {g["seen"] for g in crack} == {True}
    assert sum(g["n"] - g["flagged"] for g in crack) == int(((ev["defect"] == "crack") & (ev["score"] < 0.5)).sum())
    # every bin of every group as numpy counts it (a score equal to the top edge in the last bin)
    for by in ("label_name", "defect"):
        for name, part in ev.groupby(by):
            want = np.histogram(part["score"], bins=10, range=(lo, hi))[0]
            got = np.zeros(10, int)
            for b in bins:
                if figures.group_name(b["label_at_run"], b["defect_type_at_run"], by) == name:
                    got[b["bin"]] += b["n"]
            assert got.tolist() == want.tolist(), (by, name)
    fig = figures.binned_histogram(bins, "label_name", 0.5)
    assert sum(sum(t.y) for t in fig.data) == len(ev) and {t.name for t in fig.data} == {"normal", "anomaly"}


@pytest.mark.parametrize("ascending", [False, True])
def test_ranked_rows_and_ranks_match_a_stable_sort_of_every_row(run, ascending):
    df = _all(run.id)
    roles = ["test", "scored"]
    want = df[df["role"].isin(roles)].sort_values("score", ascending=ascending, kind="stable")  # ties: by id
    ids = want["image_id"].tolist()
    with session_scope() as s:
        assert sv.ranked_count(s, run.id, roles) == len(ids)
        assert sv.ranked_count(s, run.id) == N
        got = [r["image_id"] for k in range(0, len(ids), 17)
               for r in sv.ranked_rows(s, run.id, roles, ascending, offset=k, limit=17)]
        assert got == ids
        row = sv.ranked_rows(s, run.id, roles, ascending, offset=5)[0]
        assert row["rel_path"] == want.iloc[5]["rel_path"] and row["label"] == want.iloc[5]["label"]
        for pos in (0, 7, len(ids) // 2, len(ids) - 1):
            assert sv.rank_of(s, run.id, ids[pos], roles, ascending) == pos
        other = int(df.loc[df["role"] == "calibration", "image_id"].iloc[0])
        assert sv.rank_of(s, run.id, other, roles, ascending) is None


def _queue_from_every_row(run, n: int, strategy: str) -> list[int]:
    """The queue as computed before, from every score and embedding of the run."""
    with session_scope() as s:
        rows = q.run_scores(s, run.id)
        ids, emb, _ = q.run_embeddings(s, run.id)
    pos = {int(i): k for k, i in enumerate(ids)}
    cand = [r for r in rows if r["label"] == "unlabeled"]
    labelled = [pos[r["image_id"]] for r in rows if r["label"] != "unlabeled"]
    pick = active.select_next(np.array([r["score"] for r in cand]), emb[[pos[r["image_id"]] for r in cand]], n=n,
                              strategy=strategy, threshold=run.threshold, labelled_embeddings=emb[labelled])
    return [int(cand[i]["image_id"]) for i in pick]


@pytest.mark.parametrize("strategy", ["uncertain", "anomalous"])
def test_label_next_reads_only_its_pool_and_picks_the_same_queue(run, strategy, monkeypatch):
    ids, how = label_next.make_queue(run, 12, strategy)
    assert ids == _queue_from_every_row(run, 12, strategy)
    assert how == "spread over the run's embedding space, away from the 200 labelled images"
    with session_scope() as s:
        assert all(im.label == "unlabeled" for im in q.get_images(s, run.project_id, ids))
    # above the cap the labelled images' embeddings are a seeded sample, and the page says so
    monkeypatch.setattr(label_next, "ANCHORS_MAX", 50)
    sampled, how = label_next.make_queue(run, 12, strategy)
    assert how.endswith("away from a sample of 50 of the 200 labelled images")
    assert len(sampled) == 12 and sampled == label_next.make_queue(run, 12, strategy)[0]


def test_the_map_reads_a_sample_a_density_grid_regions_and_found_names(run):
    df = _all(run.id)
    on_map = df.dropna(subset=["tsne_x"]).sort_values("image_id")
    ids = on_map["image_id"].to_numpy()
    with session_scope() as s:
        assert sv.map_count(s, run.id) == len(on_map) == N - N // 10
        extent = sv.map_extent(s, run.id)
        assert extent == (len(on_map), on_map["tsne_x"].min(), on_map["tsne_x"].max(), on_map["tsne_y"].min(),
                          on_map["tsne_y"].max())
        assert np.array_equal(sv.map_density(s, run.id, 8, extent)[2], sv.map_density(s, run.id, 8)[2])
        rows, total = sv.map_sample(s, run.id, 100)  # a fixed sample of about 100
        again = [r["image_id"] for r in sv.map_sample(s, run.id, 100)[0]]
        assert total == len(on_map) and 70 <= len(rows) <= 130 and [r["image_id"] for r in rows] == again
        assert again == sorted(again) and np.ptp(again) > 0.8 * np.ptp(ids)  # spread over the ids
        assert set(again) < set(ids.tolist()) and "rel_path" in rows[0]
        assert len(sv.map_sample(s, run.id, 10_000)[0]) == len(ids)  # under the cap: every point
        # the density of every point, counted by the database as numpy counts it
        xc, yc, z = sv.map_density(s, run.id, 8)
        want = figures.density_grid(on_map["tsne_x"], on_map["tsne_y"], 8)
        assert np.allclose(xc, want[0]) and np.allclose(yc, want[1]) and z.tolist() == want[2].tolist()
        # a box: every point inside it, drawn or not
        got, x, y = sv.map_region(s, run.id, -0.5, 1.0, -1.0, 0.5)
        inside = on_map[on_map["tsne_x"].between(-0.5, 1.0) & on_map["tsne_y"].between(-1.0, 0.5)]
        assert got.tolist() == inside["image_id"].tolist() and np.allclose(x, inside["tsne_x"])
        found = sv.find_on_map(s, run.id, "PART_00")  # any case
        assert found and all("part_00" in r["rel_path"] for r in found) and len(found) <= 20
        assert [r["rel_path"] for r in found] == sorted(r["rel_path"] for r in found)
        assert sv.find_on_map(s, run.id, "%") == []  # a wildcard is a character like any other
        held = sv.held_out_rows(s, run.id)
    assert [r["image_id"] for r in held] == sorted(df.loc[df["role"] == "test", "image_id"])

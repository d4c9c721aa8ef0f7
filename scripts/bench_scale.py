"""How import, the Label page's queries, scoring and memory grow with a project's size.

For each N in ``--sizes`` (default 1,000 / 10,000 / 100,000): generates N small
synthetic PNGs in MVTec layout (70 % train/good, 10 % test/good, 10 % each of two
defect types; seeded) under a temporary folder, then on SQLite and, with ``--pg`` or
``--pg-tmp``, on PostgreSQL:

* **import**: ``osad_core.folder_import`` as the app's import job runs it (batches of
  500, every file checked, decoded at reduced size, hashed and its grid thumbnail
  written to a scratch data directory): seconds, files/s;
* **queries**: the Label page's filters / sorts / pages (``db.queries.image_page``),
  its grouped counts, the Projects page's ``list_projects``, and what Results, Inspect
  and "Label next" read (``db.score_views``), after a run's scores, t-SNE coordinates
  and 64-D embeddings for every image were stored: first call and median of 5 (ms);
  for comparison, reading every score of the run once (how those views read before);
* **score** (once per N, no database): ``osad_core.bulk_score.score_paths`` with a tiny
  random-weight DevNet at 32 px, batches of 256, rows to a CSV: seconds, images/s;
* database size, and the peak RSS of each phase (each runs in a process of its own).

    python scripts/bench_scale.py --sizes 1000 10000 100000 --pg-tmp --json /tmp/scale.json
    python scripts/bench_scale.py --sizes 1000 --keep /tmp/osad-scale    # reuse the images next time

Images are removed afterwards unless ``--keep DIR`` names where to keep (and reuse) them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = (("train/good", 0.7), ("test/good", 0.1), ("test/crack", 0.1), ("test/hole", 0.1))


# --- data ------------------------------------------------------------------------------


def generate(folder: Path, n: int, size: int, seed: int) -> Path:
    """N PNGs of ``size`` px in MVTec layout (reused when the folder already holds them)."""
    import numpy as np
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size} {seed}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    i = 0
    for sub, share in CLASSES:
        (folder / sub).mkdir(parents=True)
        k = n - i if sub == CLASSES[-1][0] else round(n * share)
        for j in range(k):
            img = rng.normal(120, 12, (size, size, 1)).clip(0, 255).astype(np.uint8).repeat(3, axis=2)
            if sub.startswith("test/") and sub != "test/good":
                y, x = rng.integers(2, size - 10, 2)
                img[y:y + 8, x:x + 8] = 250 if sub.endswith("crack") else 10
            Image.fromarray(img).save(folder / sub / f"{j:06d}.png", compress_level=1)
        i += k
    done.write_text(f"{n} {size} {seed}")
    return folder


def phase_train(folder: str, out: str) -> dict:
    """A DevNet on random ResNet-18 weights, 32 px, 1 step: its speed, not its AUROC, matters."""
    if not Path(out).is_file():
        import contextlib

        from osad_core.cli import main

        with contextlib.redirect_stdout(sys.stderr):
            rc = main(["train", "--data", folder, "--method", "devnet", "--preset", "tiny", "--shots", "2",
                       "--weights", "random", "--backbone", "resnet18", "--image-size", "32", "--epochs", "1",
                       "--steps-per-epoch", "1", "--device", "cpu", "--no-db", "--out", out])
        assert rc == 0, "training the tiny model failed"
    return {"model": out}


# --- phases (each in a child process: ``--phase NAME``) ----------------------------------


def _rss() -> float:
    from osad_core.bulk_score import peak_rss_mb

    return round(peak_rss_mb(), 1)


def phase_import(url: str, folder: str) -> dict:
    import osad_core.store  # noqa: F401  (loads scikit-learn: once per process, not part of the import's time)
    from db import init_db, session_scope
    from db import queries as q
    from osad_core.data import load_folder
    from osad_core.folder_import import import_dataset

    init_db(url)
    t0 = time.perf_counter()
    ds = load_folder(folder)
    listed = time.perf_counter() - t0
    with session_scope(url) as s:
        pid = q.create_project(s, "bench", "cli", root_path=ds.root).id
    res = import_dataset(pid, ds, url=url)
    total = time.perf_counter() - t0
    return {"files": res.total, "added": res.added, "list_s": round(listed, 2), "import_s": round(total, 2),
            "files_per_s": round(res.added / total, 1), "peak_rss_mb": _rss()}


def _timed(fn, repeat: int = 5) -> dict:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_ms": round(1000 * first, 1), "median_ms": round(1000 * statistics.median(times), 1)}


def _store_run(url: str, pid: int) -> tuple[int, int]:
    """A finished run's rows for every image, stored as a run's are (not timed): roles as
    a run assigns them (a fifth of the training normals held out as calibration, two
    fifths of them made unlabelled and scored, the test images held out with their
    labels, ``crack`` a seen type), t-SNE coordinates and a 64-D embedding for each.
    Returns (run id, images)."""
    import numpy as np
    from sqlalchemy import select, update

    from db import session_scope
    from db import queries as q
    from db.heatmaps import encode_vector
    from db.models import Embedding, Image, ImageScore

    with session_scope(url) as s:
        run = q.create_run(s, pid, "devnet", "tiny", {}, {}, "cli")
        run.threshold = 0.5
        rid = run.id
        rows = s.execute(select(Image.id, Image.rel_path, Image.defect_type).where(Image.project_id == pid)
                         .order_by(Image.id)).all()
    rng = np.random.default_rng(0)
    scores, emb, unlabelled = [], [], []
    for k, (i, rel, dt) in enumerate(rows):
        if rel.startswith("train/"):
            role = ("calibration", "calibration", "train_normal", "train_normal", "train_normal", "train_normal",
                    "scored", "scored", "scored", "scored")[k % 10]
            at_run = "unlabeled" if role == "scored" else "normal"
        else:
            role, at_run = "test", ("anomaly" if dt else "normal")
        if role == "scored":
            unlabelled.append(i)
        x = rng.normal(size=2) + (3.0 if dt else 0.0)
        scores.append({"image_id": i, "score": float(rng.random()) * 0.6 + (0.4 if dt else 0.0), "role": role,
                       "label_at_run": at_run, "defect_type_at_run": dt, "seen": (dt == "crack") if dt else None,
                       "tsne_x": float(x[0]), "tsne_y": float(x[1])})
        emb.append({"image_id": i, "vector": encode_vector(rng.normal(size=64)), "dim": 64, "kind": "embedding"})
    with session_scope(url) as s:
        q.write_run_results(s, rid, {ImageScore: scores, Embedding: emb})
        for k in range(0, len(unlabelled), 500):
            s.execute(update(Image).where(Image.id.in_(unlabelled[k:k + 500])).values(label="unlabeled"))
        q.refresh_planner_stats(s, Image, ImageScore, Embedding)
    return rid, len(rows)


def phase_queries(url: str) -> dict:
    from types import SimpleNamespace

    os.environ["OSAD_DATABASE_URL"] = url  # the Label next queue opens its own sessions
    from db import score_views as sv
    from db import session_scope
    from db import queries as q
    from ui import label_next

    with session_scope(url) as s:
        pid = q.get_project_by_name(s, "bench").id
    rid, n = _store_run(url, pid)
    run = SimpleNamespace(id=rid, threshold=0.5)

    def page(**kw):
        def run_it():
            with session_scope(url) as s:
                q.image_page(s, pid, limit=48, **kw)
        return run_it

    def counts():
        with session_scope(url) as s:
            q.label_counts(s, pid)
            q.defect_types(s, pid)

    def projects():
        with session_scope(url) as s:
            q.list_projects(s)

    def reads(fn):
        def run_it():
            with session_scope(url) as s:
                fn(s)
        return run_it

    def threshold_tab(s):  # what Results' "Threshold & scores" tab reads
        groups = sv.evaluation_groups(s, rid)
        lo, hi = min(g["min"] for g in groups), max(g["max"] for g in groups)
        sv.role_scores(s, rid, "calibration")
        sv.confusion_counts(sv.evaluation_groups(s, rid, 0.5))
        sv.evaluation_histogram(s, rid, lo, hi, 40)

    def map_tab(s):  # the map's first view (the page then keeps it per run)
        extent = sv.map_extent(s, rid)
        rows, total = sv.map_sample(s, rid, 10_000, total=extent[0])
        if total > len(rows):
            sv.map_density(s, rid, 80, extent)

    def inspect_middle(s):  # Inspect, the image ranked in the middle of every scored one
        sv.ranked_rows(s, rid, [], False, offset=sv.ranked_count(s, rid, []) // 2)

    middle = n // 2 + 1
    cases = {
        "all, by name, page 1": page(sort="name"),
        "all, by name, last page": page(sort="name", offset=n - 48),
        "normal, held out, by name, page 20": page(label="normal", split="test", sort="name", offset=20 * 48),
        "anomaly 'crack', by name, page 5": page(label="anomaly", defect_type="crack", sort="name", offset=5 * 48),
        "all, score high to low, page 1": page(score_run_id=rid, sort="score_desc"),
        "training normals, score low to high, page 100": page(label="normal", split="train", score_run_id=rid,
                                                             sort="score_asc", offset=100 * 48),
        "score 0.4-0.6, most uncertain first, page 3": page(score_run_id=rid, sort="uncertain", score_min=0.4,
                                                           score_max=0.6, offset=3 * 48),
        "Label page counts (grouped) + defect types": counts,
        "Projects page: list_projects": projects,
        "Results: threshold tab (counts, operating point, histogram)": reads(threshold_tab),
        "Results: t-SNE map (about 10,000 drawn + density of all)": reads(map_tab),
        "Results: find on the map by name": reads(lambda s: sv.find_on_map(s, rid, "000123")),
        "Results: labelling rounds' held-out rows": reads(lambda s: sv.held_out_rows(s, rid)),
        "Inspect: the image in the middle by score": reads(inspect_middle),
        "Inspect: jump to an image's rank": reads(lambda s: sv.rank_of(s, rid, middle, ["test", "scored"])),
        "Inspect: drift check's reference scores": reads(lambda s: sv.role_scores(s, rid, "calibration")),
        "Label next: 24, closest to the operating point": lambda: label_next.make_queue(run, 24, "uncertain"),
        "Label next: 24, most anomalous": lambda: label_next.make_queue(run, 24, "anomalous"),
    }
    out = {name: _timed(fn) for name, fn in cases.items()}
    # for comparison, not a view any more: every score of the run, as the views read it before
    out["(reference) every score of the run: q.run_scores"] = _timed(reads(lambda s: q.run_scores(s, rid)), 1)
    views = [v for k, v in out.items() if not k.startswith("(reference)")]
    return {"queries": out, "worst_first_ms": max(v["first_ms"] for v in views),
            "worst_median_ms": max(v["median_ms"] for v in views), "peak_rss_mb": _rss()}


def phase_score(model: str, folder: str, csv_path: str) -> dict:
    from osad_core.bulk_score import score_paths
    from osad_core.data import load_folder
    from osad_core.executors import LocalExecutor

    paths = [r.path for r in load_folder(folder).records]
    res = score_paths(LocalExecutor(), model, paths, csv_path, device="cpu", batch=256, echo=False,
                      sink=lambda p: None)
    with open(csv_path) as f:
        rows = sum(1 for _ in f) - 1
    assert rows == res["scored"] == len(paths), (rows, res["scored"], len(paths))
    return {"images": res["scored"], "score_s": round(res["seconds"], 2),
            "images_per_s": round(res["images_per_s"], 1), "peak_rss_mb": _rss()}


def db_size_mb(url: str) -> float:
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        return round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20, 1)
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.connect() as c:
        size = c.execute(text("SELECT pg_database_size(current_database())")).scalar()
    eng.dispose()
    return round(size / 2**20, 1)


def child(phase: str, *args: str, data_dir: Path | None = None) -> dict:
    """Run one phase in a fresh interpreter (so its peak RSS is its own); ``data_dir``:
    where it may write (the import's thumbnails), never the user's own data directory."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if data_dir is not None:
        env["OSAD_DATA_DIR"] = str(data_dir)
    proc = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True,
                          check=False, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- driver ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pg", metavar="URL", help="PostgreSQL server where scratch databases may be created")
    ap.add_argument("--pg-tmp", action="store_true", help="start a throw-away PostgreSQL with scripts/pg_tmp.sh")
    ap.add_argument("--no-score", action="store_true", help="leave the scoring phase out")
    ap.add_argument("--keep", metavar="DIR", help="keep the generated images here and reuse them next time")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        fn = {"import": phase_import, "queries": phase_queries, "score": phase_score, "train": phase_train}[a.phase]
        print(json.dumps(fn(*a.args)))
        return 0

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="osad-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    pg_dir = None
    pg_url = a.pg
    if a.pg_tmp and not pg_url:
        out = subprocess.run(["bash", str(REPO / "scripts" / "pg_tmp.sh"), "start"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PG_TMP_DURABLE="1")).stdout
        env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
        pg_dir, pg_url = env["PG_TMP_DIR"].strip("'"), env["OSAD_TEST_POSTGRES_URL"].strip("'")
    scratch = None
    if pg_url:
        from db.scratch import ScratchDatabases

        scratch = ScratchDatabases(pg_url, prefix="osad_bench_scale")
    results = []
    try:
        model = None
        if not a.no_score:  # trained in a child: this process stays small, as the phases' peaks are theirs
            model = work / "tiny_devnet.osad"
            child("train", str(generate(work / "train", 60, 32, a.seed)), str(model))
        for n in a.sizes:
            t0 = time.perf_counter()
            folder = generate(work / f"images_{n}", n, a.image_size, a.seed)
            print(f"\n== {n:,} images ({a.image_size} px PNG; generated in {time.perf_counter() - t0:.0f} s) ==",
                  flush=True)
            row: dict = {"n": n}
            backends = [("sqlite", None)] + ([("postgresql", scratch)] if scratch else [])
            for name, srv in backends:
                dbdir = Path(tempfile.mkdtemp(prefix="osad-scale-db-"))  # the scratch data directory
                url = f"sqlite:///{dbdir / 'osad.db'}" if srv is None else srv.create()
                try:
                    imp = child("import", url, str(folder), data_dir=dbdir)
                    qs = child("queries", url, data_dir=dbdir)
                    size = db_size_mb(url)
                finally:
                    shutil.rmtree(dbdir, ignore_errors=True)
                    if srv is not None:
                        srv.drop(url)
                row[name] = {"import": imp, "queries": qs, "db_mb": size}
                print(f"{name:>10}: import {imp['import_s']:.1f} s ({imp['files_per_s']:,.0f} files/s, "
                      f"peak {imp['peak_rss_mb']:.0f} MiB) · queries worst {qs['worst_first_ms']:.0f} ms first, "
                      f"{qs['worst_median_ms']:.0f} ms median (peak {qs['peak_rss_mb']:.0f} MiB) · "
                      f"database {size:.1f} MiB", flush=True)
                for case, t in qs["queries"].items():
                    print(f"{'':>12}{case:<62} {t['first_ms']:>8.1f} ms first {t['median_ms']:>8.1f} ms median")
            if model is not None:
                csv_path = work / f"scores_{n}.csv"
                sc = child("score", str(model), str(folder), str(csv_path))
                csv_path.unlink(missing_ok=True)
                row["score"] = sc
                print(f"{'score':>10}: {sc['images']:,} images in {sc['score_s']:.1f} s "
                      f"({sc['images_per_s']:,.0f} images/s, peak {sc['peak_rss_mb']:.0f} MiB)", flush=True)
            results.append(row)
            if not a.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if scratch is not None:
            scratch.close()
        if pg_dir:
            subprocess.run(["bash", str(REPO / "scripts" / "pg_tmp.sh"), "stop", pg_dir], check=False)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| images | backend | import s | files/s | import peak MiB | worst query ms (first / median) "
          "| DB MiB | score s | images/s | score peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        sc = row.get("score", {})
        for name in ("sqlite", "postgresql"):
            if name not in row:
                continue
            r = row[name]
            print(f"| {row['n']:,} | {name} | {r['import']['import_s']:.1f} | {r['import']['files_per_s']:,.0f} | "
                  f"{r['import']['peak_rss_mb']:.0f} | {r['queries']['worst_first_ms']:.0f} / "
                  f"{r['queries']['worst_median_ms']:.0f} | {r['db_mb']:.1f} | {sc.get('score_s', '–')} | "
                  f"{sc.get('images_per_s', '–')} | {sc.get('peak_rss_mb', '–')} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": a.sizes, "image_size": a.image_size, "seed": a.seed,
                                            "load": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the user waits in the app: the t-SNE map of a run and a cold app's first paint.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_ui_speed.py            # both
    .venv/bin/python scripts/bench_ui_speed.py --only tsne --sizes 1000 5000 10000 --sklearn
    .venv/bin/python scripts/bench_ui_speed.py --only paint --repeats 3

t-SNE: ``osad_core.evaluate.tsne_2d`` on synthetic embeddings (a mixture of 10 Gaussian
clusters in 512 dimensions, the width of the detectors' pooled features, seed 0), wall and
CPU seconds per size; ``--sklearn`` also times scikit-learn's Barnes-Hut t-SNE (the map's
former implementation) on the same points. The 10-nearest-neighbour accuracy of the
cluster labels in 2-D (3-fold) says whether the map still separates what the embeddings
separate; on scikit-learn's digits (1,797 real 8x8 images) both implementations are
compared the same way, which is how small maps stay comparable.

The job's t-SNE stage (``--only tsne-job``): ``tsne_2d`` as ``score_rest`` calls it, on
a mixture of 50 Gaussian clusters in 64 dimensions (seed 0), each size and version in a
process of its own: *before* is the map fitted on every embedding without progress
reporting (the code before the cap), *after* is today's job (fitted on a fixed sample of
``TSNE_FIT_MAX`` above it, the others placed with openTSNE's ``transform``, progress and
cancel checks on). Wall and CPU seconds, resident memory before the call and its peak
(``VmHWM``), the 10-NN accuracy of the cluster labels in 2-D (3-fold), and for *after*
the share of placed points whose nearest fitted point on the map is of their own
cluster. A case still running after ``--timeout`` seconds is stopped and said so.

    .venv/bin/python scripts/bench_ui_speed.py --only tsne-job --job-sizes 10000 20000 50000 100000

First paint: ``streamlit run app.py`` on a free loopback port, with a new data folder and
again with the one that first start made,
Debian's Chromium (through the playwright package, no browser download) opens the page the
moment the server answers; the time from starting the server to the Projects heading being
visible, median of ``--repeats`` cold starts. The browser is started before the clock.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _mixture(n: int, dim: int = 512, k: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (k, dim)) * 0.6  # clusters overlap a little, as real features do
    lab = rng.integers(0, k, n)
    return (centres[lab] + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32), lab


def _knn_acc(y: np.ndarray, lab: np.ndarray) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(10), y, lab, cv=3).mean())


def _timed(fn):
    w, c = time.perf_counter(), _cpu_s()
    out = fn()
    return out, time.perf_counter() - w, _cpu_s() - c


def _sklearn_tsne(x: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def bench_tsne(sizes: list[int], with_sklearn: bool) -> None:
    from sklearn.datasets import load_digits

    from osad_core.evaluate import tsne_2d

    print(f"t-SNE, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    digits = load_digits()
    xd, ld = digits.data.astype(np.float32), digits.target
    for name, fn in (("osad tsne_2d", lambda: tsne_2d(xd, seed=0)), ("sklearn TSNE", lambda: _sklearn_tsne(xd))):
        y, wall, cpu = _timed(fn)
        print(f"  digits 1797 x 64   {name:13s} {wall:6.1f} s wall {cpu:6.1f} s CPU   10-NN accuracy {_knn_acc(y, ld):.3f}")
    for n in sizes:
        x, lab = _mixture(n)
        runs = [("osad tsne_2d", lambda: tsne_2d(x, seed=0))]
        if with_sklearn:
            runs.append(("sklearn TSNE", lambda: _sklearn_tsne(x)))
        for name, fn in runs:
            y, wall, cpu = _timed(fn)
            print(f"  mixture {n:5d} x 512 {name:13s} {wall:6.1f} s wall {cpu:6.1f} s CPU   "
                  f"10-NN accuracy {_knn_acc(y, lab):.3f}   load {os.getloadavg()[0]:.1f}", flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tsne_job_case(n: int, version: str, fit_max: int | None = None) -> None:
    """One case of ``bench_tsne_job`` in this process; prints one result line.
    ``fit_max``: another cap than ``TSNE_FIT_MAX`` for *after* (to compare caps)."""
    import json

    from osad_core import evaluate
    from osad_core.train import Callbacks  # the job's progress object (imports torch, as a job has)

    x, lab = _mixture(n, dim=64, k=50)
    rss0 = _status_kib("VmRSS")
    if version == "before":
        evaluate.TSNE_FIT_MAX = 1 << 62  # every embedding fitted, no progress: the stage before the cap
        fn = lambda: evaluate.tsne_2d(x, seed=0)  # noqa: E731
    else:
        if fit_max:
            evaluate.TSNE_FIT_MAX = fit_max
        seen = []
        cb = Callbacks(seen.append, lambda: False)  # a cancel check, as the worker asks
        fn = lambda: evaluate.tsne_2d(x, seed=0, callbacks=cb)  # noqa: E731
    y, wall, cpu = _timed(fn)
    out = {"n": n, "version": version, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "rss_before_mib": round(rss0 / 1024), "peak_rss_mib": round(_status_kib("VmHWM") / 1024),
           "finite": bool(np.isfinite(y).all()), "knn10_acc": round(_knn_acc(y, lab), 3),
           "load": round(os.getloadavg()[0], 1)}
    fitted = evaluate.tsne_fit_sample(n, seed=0)
    if version == "after" and fitted is not None:
        from sklearn.neighbors import KNeighborsClassifier

        placed = np.setdiff1d(np.arange(n), fitted)
        near = KNeighborsClassifier(1).fit(y[fitted], lab[fitted]).predict(y[placed])
        out["placed_same_cluster"] = round(float((near == lab[placed]).mean()), 3)
        hd = KNeighborsClassifier(1).fit(x[fitted], lab[fitted]).predict(x[placed])
        out["placed_same_cluster_in_64d"] = round(float((hd == lab[placed]).mean()), 3)
        out["n_fitted"] = len(fitted)
        out["reports"] = len(seen)
    print("RESULT " + json.dumps(out), flush=True)


def bench_tsne_job(sizes: list[int], timeout_s: float, versions: list[str], fit_max: int | None = None) -> list[dict]:
    import json

    print(f"the job's t-SNE stage, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"50 clusters in 64-d, seed 0")
    rows = []
    for n in sizes:
        for version in versions:
            cmd = [sys.executable, __file__, "--tsne-job-case", str(n), version,
                   *(["--fit-max", str(fit_max)] if fit_max else [])]
            t0 = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
            except subprocess.TimeoutExpired:
                print(f"  {n:7,d} {version:6s} not finished after {time.perf_counter() - t0:.0f} s (stopped)   "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                rows.append({"n": n, "version": version, "timeout_s": timeout_s})
                continue
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"  {n:7,d} {version:6s} failed: {done.stderr[-400:]}", flush=True)
                continue
            r = json.loads(line[-1][7:])
            rows.append(r)
            extra = (f"   placed next to own cluster {r['placed_same_cluster']:.3f} (64-d 1-NN "
                     f"{r['placed_same_cluster_in_64d']:.3f}), fitted {r['n_fitted']:,}"
                     if "placed_same_cluster" in r else "")
            print(f"  {n:7,d} {version:6s} {r['wall_s']:7.1f} s wall {r['cpu_s']:7.1f} s CPU   RSS "
                  f"{r['rss_before_mib']:5d} -> peak {r['peak_rss_mib']:5d} MiB   10-NN accuracy {r['knn10_acc']:.3f}"
                  f"{extra}   load {r['load']:.1f}", flush=True)
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def cold_paint_once(browser, data: str, timeout_s: float = 120.0, cwd: Path = REPO) -> tuple[float, float, float]:
    """Seconds from ``streamlit run app.py`` (data folder ``data``) to the server answering,
    and to the Projects heading painted in Chromium; and the CPU seconds the server had
    used by then (what a busy machine stretches, an idle one does not)."""
    import urllib.request

    port = _free_port()
    env = dict(os.environ, OSAD_DATA_DIR=data, OSAD_AUTOSTART_WORKER="0", OSAD_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE")
    env.pop("OSAD_DATABASE_URL", None)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if time.perf_counter() - t0 > timeout_s or proc.poll() is not None:
                raise RuntimeError("the app did not start")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.05)
        up = time.perf_counter() - t0
        page.goto(url)
        page.get_by_role("heading", level=1).filter(has_text="Projects").wait_for(timeout=timeout_s * 1000)
        return up, time.perf_counter() - t0, _process_cpu_s(proc.pid)
    finally:
        page.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_paint(repeats: int) -> None:
    """A first start (no database yet: the schema is created) and a restart (the database
    exists), each ``repeats`` times in a new server process."""
    from playwright.sync_api import sync_playwright

    print(f"cold first paint, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        # the floor: Streamlit itself, a one-line app that shows the same heading
        floor = Path(tmp) / "floor"
        floor.mkdir()
        (floor / "app.py").write_text('import streamlit as st\nst.title("Projects")\n')
        for case in ("one-line Streamlit app (the floor)", "first start, new database", "restart, existing database"):
            times = []
            for k in range(repeats):
                data = os.path.join(tmp, f"fresh{k}") if case.startswith("first") else os.path.join(tmp, "fresh0")
                up, painted, cpu = cold_paint_once(browser, data, cwd=floor if "floor" in case else REPO)
                times.append(painted)
                print(f"  {case}: server answers after {up:.2f} s, first paint after {painted:.2f} s, "
                      f"server CPU {cpu:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
            print(f"{case}: first paint, median of {repeats}: {statistics.median(times):.2f} s")
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["tsne", "tsne-job", "paint"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--sklearn", action="store_true", help="also time scikit-learn's t-SNE")
    ap.add_argument("--job-sizes", type=int, nargs="+", default=[10000, 20000, 50000, 100000],
                    help="embeddings of the job's t-SNE stage cases")
    ap.add_argument("--versions", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a t-SNE stage case is stopped")
    ap.add_argument("--fit-max", type=int, default=None, help="another cap for the after cases (default TSNE_FIT_MAX)")
    ap.add_argument("--tsne-job-case", nargs=2, metavar=("N", "VERSION"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.tsne_job_case:
        tsne_job_case(int(args.tsne_job_case[0]), args.tsne_job_case[1], args.fit_max)
        return
    if args.only in (None, "tsne"):
        bench_tsne(args.sizes, args.sklearn)
    if args.only in (None, "tsne-job"):
        bench_tsne_job(args.job_sizes, args.timeout, args.versions, args.fit_max)
    if args.only in (None, "paint"):
        bench_paint(args.repeats)


if __name__ == "__main__":
    main()

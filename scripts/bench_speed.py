"""Speed where a person waits, side by side in one run; prints tables and ratios.

Absolute times on a shared machine move from run to run; the ratios are what to compare.
Independent parts (``--part``, repeatable; default all):

* ``press``: pressing Train on the ELPV demo (2,624 images) as the app does: a fresh
  data folder and database, the demo project, one job queued with the Train page's
  defaults (quick preset, seed 42, general setting, 10 shots), a real worker process.
  Reports when the run's results (AUROC, curves, threshold) were stored, when the job
  (heatmaps of every image, t-SNE map) ended, and how long each stage took.
* ``score``: scoring throughput with scores, heatmaps and embeddings (``predict_arrays``)
  against the bare backbone's forward pass (the detector's own trunk or extractor,
  inference mode) at the same batch size and resolution, per method.
* ``train``: training throughput (backbone image-equivalents per second during ``fit``,
  at the method's resolution) against the bare backbone's forward + backward rate at
  the method's training batch size, per method.
* ``first``: the first scoring pass right after training against the next two (on a GPU
  the first used to take seconds where the next took a fraction of one); ``--profile-first``
  prints where the first pass's time went.
* ``schedule``: DRA's paper preset (448 px, batch 48: the official code's schedule), timed
  per training setting (as is, channels-last, bf16 mixed precision, images kept on the
  device, all three): seconds per step after two, projected to the full 600 steps, and the
  speed-up of each. For a GPU (``--device cuda``); ``--schedule-size`` tries it on a CPU.
* ``tsne``: the t-SNE map of 1k / 5k / 10k embeddings, and the job's t-SNE stage at 10k /
  20k / 50k / 100k embeddings before and after its cap (fitted on every embedding against a
  fixed sample with the others placed into it; seconds, peak memory; ``scripts/bench_ui_speed.py``).
* ``paint``: a cold app's first paint in headless Chromium (``scripts/bench_ui_speed.py``).
* ``scale``: 1k / 10k / 100k-image projects: import, Label queries, Projects counts,
  scoring, database size and peak memory (``scripts/bench_scale.py``; add PostgreSQL
  by running it directly with ``--pg-tmp``).

    OMP_NUM_THREADS=1 python scripts/bench_speed.py --part score --part train --short
    python scripts/bench_speed.py --device cuda --part first --part schedule --part train --profile-first
    python scripts/bench_speed.py --part press --press-methods fusion,dra --json out.json

``--clock cpu`` times the score and train parts by the process's CPU time instead of the
wall clock: with one thread it leaves out the time other users' processes hold the cores.
``--short`` keeps it to a check: 32 scored images, a few training steps, and for
``press`` a 300-image subset of the demo (not the 3-minute question).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fusion", "fusion-w0", "dra", "devnet", "saliencycut", "ahl", "bgad", "ckaad")
# names of the score / train parts that are a method with other settings
ALIASES = {"fusion-w0": ("fusion", {"recon_weight": 0})}  # Fusion without its reconstruction part
# a few steps of each method's training loop: the rate is what counts, not the model
SHORT_FIT = {
    "dra": dict(epochs=1, steps_per_epoch=3), "devnet": dict(epochs=1, steps_per_epoch=3),
    "saliencycut": dict(epochs=1, steps_per_epoch=3),
    "ahl": dict(epochs=1, n_episodes=2, base_overrides={"epochs": 1, "steps_per_epoch": 3}),
    "bgad": dict(epochs=1, steps_per_epoch=3), "ckaad": dict(epochs=1, steps_per_epoch=3),
    # the reconstruction part kept whatever its gate would say: the slower of Fusion's two cases
    "fusion": dict(head_steps=20, recon_epochs=1, recon_steps=3, recon_gate=False),
}
# normals fitted before scoring: Fusion's search costs in proportion to its memory, which
# fills (memory_max patches) from about 40 normals on at the quick preset, as in any real
# project; 24 normals left it at 2,458 of 4,096 patches, and its scoring a fifth cheaper
SCORE_NORMALS = {"fusion": 48, "fusion-w0": 48}


def load_cpu() -> str:
    try:
        la = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} on {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------
# press: Train on the ELPV demo, as the app does it
# --------------------------------------------------------------------------------------
def elpv_subset(limit: int | None):
    from osad_core.data import Dataset, import_elpv

    ds = import_elpv(include_uncertain=True)
    if not limit or limit >= len(ds.records):
        return ds
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(ds.records), size=limit, replace=False))
    return Dataset(ds.name, [ds.records[i] for i in keep], ds.root)


def press(method: str, preset: str, limit: int | None, threads: int | None) -> dict:
    """One Train press in a fresh data folder; the worker runs as the app starts it."""
    data = tempfile.mkdtemp(prefix="osad_bench_press_")
    env = dict(os.environ, OSAD_DATA_DIR=data, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env.pop("OSAD_DATABASE_URL", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    os.environ.update(OSAD_DATA_DIR=data)
    os.environ.pop("OSAD_DATABASE_URL", None)
    from db import dispose_engines, init_db, session_scope
    from db import queries as q
    from osad_core.store import ensure_project
    from ui import training

    dispose_engines()
    init_db()
    pid = ensure_project(elpv_subset(limit), "ELPV solar cells (demo)")
    av = training.availability(pid)
    req = training.TrainRequest(pid, method, preset, 42, "auto", "general", av.default_shots())
    payload = req.payload()
    with session_scope() as s:
        run = q.create_run(s, pid, method, preset, {"overrides": payload["overrides"]}, req.protocol(), "app",
                           status="queued")
        job = q.enqueue_job(s, "train", payload, run_id=run.id)
        run_id, job_id = run.id, job.id

    log = open(Path(data) / "worker.log", "wb")
    t0 = time.time()
    worker = subprocess.Popen([sys.executable, "-m", "osad_core", "worker", "--once"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    stages: dict[str, float] = {}
    results_at = None
    while True:
        with session_scope() as s:
            j, r = q.get_job(s, job_id), q.get_run(s, run_id)
            stage = (j.progress_json or {}).get("stage")
            status, rstatus, error = j.status, r.status, j.error
        now = time.time() - t0
        if stage and stage not in stages:
            stages[stage] = now
        if results_at is None and rstatus == "done":
            results_at = now
        if status in ("done", "failed", "cancelled") or worker.poll() is not None and status != "running":
            break
        time.sleep(0.25)
    job_end = time.time() - t0
    worker.wait(timeout=60)
    # the largest resident set of this process's waited-for descendants (worker, job process):
    # the press's own peak when a bench process runs one press
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with session_scope() as s:
        metrics = q.run_metrics(s, run_id)
        n_rows = len(q.run_scores(s, run_id))
    order = sorted(stages.items(), key=lambda kv: kv[1])
    spans = {name: (order[i + 1][1] if i + 1 < len(order) else job_end) - start for i, (name, start) in enumerate(order)}
    with session_scope() as s:
        n_images = len(q.get_images(s, pid))
    return {"method": method, "preset": preset, "images": n_images, "status": status, "error": error,
            "results_s": results_at, "job_s": job_end, "stages": spans, "image_auroc": metrics.get("image_auroc"),
            "rows": n_rows, "data_dir": data, "peak_rss_mib": peak_mib,
            "malloc_tune": os.environ.get("OSAD_MALLOC_TUNE", "1") != "0"}


def part_press(a) -> list[dict]:
    out = []
    for m in a.press_methods.split(","):
        print(f"\npress: {m} ({a.preset}) … ({load_cpu()})", flush=True)
        r = press(m, a.preset, 300 if a.short else a.press_limit, a.threads)
        out.append(r)
        print(f"  {r['images']:,} images · results after {r['results_s']:.1f} s · job done after {r['job_s']:.1f} s"
              f" ({r['status']}{': ' + r['error'] if r['error'] else ''}) · AUROC {r['image_auroc']:.4f} · "
              f"{r['rows']:,} scored images stored · peak RSS of the worker processes so far "
              f"{r['peak_rss_mib']:,.0f} MiB (allocator tuned: {'yes' if r['malloc_tune'] else 'no'})")
        for name, span in r["stages"].items():
            print(f"    {name:24s} {span:7.1f} s")
    return out


# --------------------------------------------------------------------------------------
# score / train: a method against its own bare backbone
# --------------------------------------------------------------------------------------
def _trunk(det):
    """The detector's backbone module (what a bare forward pass runs)."""
    return det.model.trunk if hasattr(det, "model") and hasattr(det.model, "trunk") else (
        det.base.model.trunk if hasattr(det, "base") else det.extractor)


def _fitted(method: str, preset: str, n_normal: int, n_anomaly: int):
    """``method`` fitted for a few steps on ELPV training images (the rate needs no good model)."""
    from osad_core.methods.base import make_detector
    from osad_core.protocol import Protocol, make_split

    ds = elpv_subset(None)
    split = make_split(ds, Protocol("general", n_anomaly, seed=0))
    method, extra = ALIASES.get(method, (method, {}))
    det = make_detector(method, preset, dict(SHORT_FIT.get(method, {}), seed=0, device=DEVICE, **extra))
    normals = split.train_normal[:n_normal]
    return det, normals, split.train_anomalies


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]
DEVICE = "auto"  # --device: where the detectors of the score, train, first and schedule parts run


def _sync() -> None:
    """Wait for the GPU's queued work (its calls return before it is done), so clocks are honest."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN kernel choice
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        _sync()
        best = min(best, CLOCK() - t0)
    return n_images / best


def score_one(method: str, preset: str, n: int, repeats: int) -> dict:
    import torch

    from osad_core import augment

    det, normals, anomalies = _fitted(method, preset, SCORE_NORMALS.get(method, 24), 4)
    det.fit(normals, anomalies)
    c = det.config
    S, bs = int(c["image_size"]), int(c.get("test_batch_size", 32))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)
    trunk = _trunk(det).eval()
    dev = next(trunk.parameters()).device

    def bare():
        with torch.inference_mode():
            for i in range(0, n, bs):
                trunk(augment.test_transform(images[i:i + bs]).to(dev))

    bare_rate = _rate(bare, n, repeats)
    full_rate = _rate(lambda: det.predict_arrays(images, bs), n, repeats)
    return {"method": method, "preset": preset, "image_size": S, "batch": bs, "backbone": det.backbone_info["name"],
            "bare_img_s": bare_rate, "method_img_s": full_rate, "ratio": full_rate / bare_rate,
            "memory_patches": int(det.memory.shape[0]) if getattr(det, "memory", None) is not None else None}


def train_one(method: str, preset: str, repeats: int) -> dict:
    import torch

    from osad_core import augment
    from osad_core.backbones import MultiScaleExtractor, _LiteTrunk, _ResNetTrunk

    det, normals, anomalies = _fitted(method, preset, 64, 4)
    c = det.config
    S = int(c["image_size"])
    seen = [0.0]

    def count(module, args, output):  # backbone image-equivalents at the method's resolution
        if isinstance(module, (MultiScaleExtractor, _LiteTrunk, _ResNetTrunk)) and args:
            x = args[0]
            seen[0] += x.shape[0] * (x.shape[-1] * x.shape[-2]) / (S * S)

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        t0 = CLOCK()
        det.fit(normals, anomalies)
        _sync()
        fit_s = CLOCK() - t0
    finally:
        hook.remove()
    rate = seen[0] / fit_s
    bs = int(c.get("batch_size") or c.get("head_batch") or 16)
    ref = copy.deepcopy(_trunk(det)).train()  # a trainable copy: frozen trunks are timed as if trained
    for p in ref.parameters():
        p.requires_grad_(True)
    fwd = (lambda t: _unfrozen(ref, t)) if isinstance(ref, MultiScaleExtractor) else ref
    x = augment.test_transform(np.random.default_rng(0).integers(0, 256, (bs, S, S, 3), dtype=np.uint8))
    x = x.to(next(ref.parameters()).device)

    def fwd_bwd():
        out = fwd(x)
        sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
        for p in ref.parameters():
            p.grad = None

    bare = _rate(fwd_bwd, bs, repeats)
    return {"method": method, "preset": preset, "image_size": S, "batch": bs, "backbone": det.backbone_info["name"],
            "fit_s": fit_s, "images_seen": seen[0], "method_img_s": rate, "bare_fwd_bwd_img_s": bare,
            "ratio": rate / bare}


def _unfrozen(ext, x):
    """A frozen extractor's forward without its no-grad guard (for the backward reference)."""
    out, h = [], ext.stem(x)
    for i, stage in enumerate(ext.stages):
        h = stage(h)
        if i + 1 in ext.layers:
            out.append(h)
    return out


def _each_method(a, measure, row) -> list[dict]:
    """``measure(method)`` for each of ``--methods``, printing ``row(method, result)`` as each ends."""
    out = []
    for m in a.methods.split(","):
        out.append(measure(m))
        print(row(m, out[-1]), flush=True)
    return out


def part_score(a) -> list[dict]:
    print(f"\nscore: {a.n_score} random images per method, best of {a.repeats} ({load_cpu()})", flush=True)
    print(f"  {'method':12s} {'size':>5s} {'batch':>5s} {'bare img/s':>11s} {'method img/s':>13s} {'ratio':>6s} "
          f"{'memory':>7s}")
    return _each_method(a, lambda m: score_one(m, a.preset, a.n_score, a.repeats), lambda m, r: (
        f"  {m:12s} {r['image_size']:5d} {r['batch']:5d} {r['bare_img_s']:11.1f} {r['method_img_s']:13.1f} "
        f"{r['ratio']:6.2f} {r['memory_patches'] or '-':>7}"))


def part_train(a) -> list[dict]:
    print(f"\ntrain: a few steps of each method on ELPV images ({load_cpu()})", flush=True)
    print(f"  {'method':12s} {'size':>5s} {'batch':>5s} {'fit s':>7s} {'method img/s':>13s} {'bare f+b img/s':>15s} "
          f"{'ratio':>6s}")
    return _each_method(a, lambda m: train_one(m, a.preset, a.repeats), lambda m, r: (
        f"  {m:12s} {r['image_size']:5d} {r['batch']:5d} {r['fit_s']:7.1f} {r['method_img_s']:13.1f} "
        f"{r['bare_fwd_bwd_img_s']:15.1f} {r['ratio']:6.2f}"))


# --------------------------------------------------------------------------------------
# first: the first scoring pass after training against the next ones (a GPU's warm-up)
# --------------------------------------------------------------------------------------
def first_one(method: str, preset: str, n: int, profile: bool) -> dict:
    import torch

    det, normals, anomalies = _fitted(method, preset, SCORE_NORMALS.get(method, 24), 4)
    det.fit(normals, anomalies)
    _sync()
    S, bs = int(det.config["image_size"]), int(det.config.get("test_batch_size", 32))
    images = np.random.default_rng(0).integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                   if torch.cuda.is_available() else [])
    passes, table = [], ""
    for k in range(3):
        profiled = k == 0 and profile
        with torch.profiler.profile(activities=acts) if profiled else contextlib.nullcontext() as prof:
            t0 = time.perf_counter()  # wall clock: a warm-up is waiting, whoever waits
            det.predict_arrays(images, bs)
            _sync()
            passes.append(time.perf_counter() - t0)
        if profiled:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"method": method, "preset": preset, "image_size": S, "batch": bs, "images": n,
            "device": det.device_name, "passes_s": passes, "first_over_second": passes[0] / passes[1],
            "profile_first_pass": table}


def part_first(a) -> list[dict]:
    print(f"\nfirst: {a.n_first} random images scored three times right after training ({load_cpu()})", flush=True)
    print(f"  {'method':12s} {'size':>5s} {'batch':>5s} {'1st s':>8s} {'2nd s':>8s} {'3rd s':>8s} "
          f"{'1st/2nd':>8s}  device")

    def row(m, r):
        p = r["passes_s"]
        table = r["profile_first_pass"]
        profile = f"\n  first pass of {m}, by self CPU time:\n{table}" if table else ""
        return (f"  {m:12s} {r['image_size']:5d} {r['batch']:5d} {p[0]:8.2f} {p[1]:8.2f} {p[2]:8.2f} "
                f"{r['first_over_second']:8.1f}  {r['device']}{profile}")
    return _each_method(a, lambda m: first_one(m, a.preset, a.n_first, a.profile_first), row)


# --------------------------------------------------------------------------------------
# schedule: DRA's paper preset (the official code's schedule), per training setting
# --------------------------------------------------------------------------------------
SCHEDULE_VARIANTS = {
    "as is": {},
    "channels-last": {"channels_last": True},
    "bf16": {"amp": "bf16"},
    "data on device": {"data_on_device": True},
    "all three": {"channels_last": True, "amp": "bf16", "data_on_device": True},
}


def _synthetic_folder(root: Path, size: int, n_normal: int = 100, n_anomaly: int = 12) -> Path:
    """HeadCT's shape in MVTec layout (100 training normals, 10 of the anomalies labelled) of
    random images: a step's time does not depend on what the pixels show."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, n in (("train/good", n_normal), ("test/defect", n_anomaly), ("test/good", 2)):
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def schedule_one(name: str, over: dict, steps: int, size: int | None, split) -> dict:
    from osad_core.methods.base import make_detector
    from osad_core.train import Callbacks

    cfg = dict(over, device=DEVICE, seed=0, epochs=1, steps_per_epoch=steps, **({"image_size": size} if size else {}))
    det = make_detector("dra", "paper", cfg)
    stamps: list[float] = []

    class Stamps(Callbacks):
        def advance(self, step, *args, **kw):
            _sync()
            stamps.append(time.perf_counter())
            super().advance(step, *args, **kw)

    t0 = time.perf_counter()
    det.fit(split.train_normal, split.train_anomalies, Stamps())
    fit_s = time.perf_counter() - t0
    step_s = float(np.median(np.diff(stamps[2:])))  # steps after the first two (at least 4 steps)
    paper = make_detector("dra", "paper").config
    full_steps = int(paper["epochs"]) * int(paper["steps_per_epoch"])
    return {"variant": name, "settings": over, "image_size": int(det.config["image_size"]),
            "batch": int(det.config["batch_size"]), "steps": steps, "fit_s": fit_s, "step_s": step_s,
            "full_steps": full_steps, "projected_full_s": fit_s - steps * step_s + full_steps * step_s,
            "device": det.device_name}


def part_schedule(a) -> list[dict]:
    from osad_core.data import load_folder
    from osad_core.protocol import Protocol, make_split

    data = Path(a.schedule_data) if a.schedule_data else _synthetic_folder(
        Path(tempfile.mkdtemp(prefix="osad-bench-schedule-")), a.schedule_size or 448)
    split = make_split(load_folder(data), Protocol("general", 10, seed=0))
    steps = 4 if a.short else max(4, a.schedule_steps)
    print(f"\nschedule: DRA paper preset, {steps} steps per setting, the median step after two "
          f"projected to the full schedule; data {data} ({load_cpu()})", flush=True)
    print(f"  {'setting':15s} {'size':>5s} {'batch':>5s} {'s/step':>8s} {'full s':>8s} {'speed-up':>9s}  device")
    out = []
    for name, over in SCHEDULE_VARIANTS.items():
        r = schedule_one(name, over, steps, a.schedule_size, split)
        r["speed_up"] = out[0]["step_s"] / r["step_s"] if out else 1.0
        out.append(r)
        print(f"  {name:15s} {r['image_size']:5d} {r['batch']:5d} {r['step_s']:8.3f} {r['projected_full_s']:8.1f} "
              f"{r['speed_up']:9.2f}  {r['device']}", flush=True)
    return out


def _script(name: str, *args: str) -> list[dict]:
    """A part measured by its own script (it prints its own table); its JSON when it writes one."""
    cmd = [sys.executable, str(ROOT / "scripts" / name), *args]
    print(f"\n--- {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return [{"script": name, "args": list(args)}]


def part_tsne(a) -> list[dict]:
    sizes = ["1000"] if a.short else ["1000", "5000", "10000"]
    out = _script("bench_ui_speed.py", "--only", "tsne", "--sizes", *sizes)
    job = ["12000"] if a.short else ["10000", "20000", "50000", "100000"]
    return out + _script("bench_ui_speed.py", "--only", "tsne-job", "--job-sizes", *job)


def part_paint(a) -> list[dict]:
    return _script("bench_ui_speed.py", "--only", "paint", "--repeats", "1" if a.short else "3")


def part_scale(a) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="osad-bench-scale-")) / "scale.json"
    _script("bench_scale.py", "--sizes", *(["1000"] if a.short else ["1000", "10000", "100000"]), "--json", str(out))
    return json.loads(out.read_text()) if out.is_file() else []


PARTS = {"press": part_press, "score": part_score, "train": part_train, "first": part_first,
         "schedule": part_schedule, "tsne": part_tsne, "paint": part_paint, "scale": part_scale}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=(*PARTS, "all"), help="which parts (default all)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods of the score and train parts")
    p.add_argument("--press-methods", default="fusion,dra", help="methods of the press part")
    p.add_argument("--preset", default="quick")
    p.add_argument("--press-limit", type=int, default=None, help="press on a random subset of the demo's images")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the worker (default: inherited)")
    p.add_argument("--n-score", type=int, default=128, help="images per scoring measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="score and train rates by wall-clock or by this process's CPU time (steadier on a "
                        "shared machine with one thread; counts every thread's time with more)")
    p.add_argument("--device", default="auto", help="the detectors' device: auto, cpu, cuda")
    p.add_argument("--n-first", type=int, default=115, help="images of the first part (HeadCT's test set)")
    p.add_argument("--profile-first", action="store_true", help="print a profile of each first scoring pass")
    p.add_argument("--schedule-steps", type=int, default=20, help="training steps timed per setting")
    p.add_argument("--schedule-size", type=int, default=None, help="image size of the schedule part "
                   "(default the paper preset's 448 px; smaller to try the part on a CPU)")
    p.add_argument("--schedule-data", help="an MVTec-layout folder instead of random images")
    p.add_argument("--short", action="store_true", help="a quick check: fewer images and repeats")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    if a.short:
        a.n_score, a.repeats, a.n_first = 32, 1, 32
    global CLOCK, DEVICE
    CLOCK, DEVICE = CLOCKS[a.clock], a.device
    import torch

    # the schedule part trains at 448 px: minutes per step on a CPU, so only asked for there
    every = [k for k in PARTS if k != "schedule" or torch.cuda.is_available()]
    parts = every if not a.part or "all" in a.part else a.part
    print(f"bench_speed: parts {', '.join(parts)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{a.clock} clock; {load_cpu()}")
    results = {name: PARTS[name](a) for name in parts}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

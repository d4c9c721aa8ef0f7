"""Score any number of images with a saved model, streamed in batches (``score``).

Batches of paths go to an executor: in this process one after the other (the default),
or as Ray tasks (``score --ray``; at most twice the cluster's slots in flight). Either
way only a bounded number of batches is ever in memory, so 100,000 images need no more
memory than 1,000: each batch's rows are written to the CSV and flushed as it comes
back (an interrupted run keeps what it scored), progress and ETA go through
:mod:`osad_core.batch_progress`, and a cancel is honoured between batches. Results come
back in the inputs' order. An ``.osad`` model travels once through the executor (a Ray
worker loads it once per process), so only the images need shared storage; an
``.onnx`` model scores with onnxruntime alone, in this process.
"""
from __future__ import annotations

import csv
import hashlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .batch_progress import BatchProgress, Sink, line_sink

_MODELS: dict = {}  # (sha256 of the model file, device) -> loaded model, per worker process


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh with each program;
    ``ru_maxrss`` survives ``exec`` and would report a parent's peak in a child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


def _detector(model_bytes: bytes, digest: str, device: str):
    from .methods.base import load_detector

    key = (digest, device)
    if key not in _MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.osad"
            path.write_bytes(model_bytes)
            _MODELS[key] = load_detector(path, device)
    return _MODELS[key]


def score_batch(model_bytes: bytes, digest: str, device: str, paths: list[str]) -> tuple[list[str], list[float], list]:
    """One batch with an ``.osad`` model: (scored paths, their scores, [(path, why) for unreadable files])."""
    pred = _detector(model_bytes, digest, device).predict(paths, cache=False)  # each image is seen once
    return [r.path for r in pred.records], [float(x) for x in pred.scores], list(pred.skipped)


def onnx_batch(model_path: str, paths: list[str]) -> tuple[list[str], list[float], list]:
    """One batch with an ``.onnx`` model (onnxruntime, no PyTorch)."""
    from .onnx_model import OnnxModel

    key = (model_path, "onnx")
    if key not in _MODELS:
        _MODELS[key] = OnnxModel(model_path)
    scores, _, records, skipped = _MODELS[key].predict(paths, cache=False)
    return [r.path for r in records], [float(x) for x in scores], list(skipped)


def load_model(model: str | Path, device: str | None = None):
    """The model file checked and loaded once, before any batch starts (a refused or
    broken file fails here): an ``OnnxModel`` or a detector."""
    if Path(model).suffix.lower() == ".onnx":
        from .onnx_model import OnnxModel

        return OnnxModel(model)
    from .methods.base import load_detector

    return load_detector(model, device or "cpu")


def score_paths(executor, model: str | Path, paths: list[str], csv_path: str | None = None,
                threshold: float | None = None, device: str | None = None, batch: int = 256,
                echo: bool = True, sink: Sink | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """Score ``paths`` with the model file ``model`` in batches of ``batch``.

    ``sink`` hears the progress (default: a line on stderr); ``should_stop()`` is asked
    between batches. Returns {"scored", "skipped", "seconds", "images_per_s", "scores"
    (in the CSV's order), "cancelled", "peak_rss_mb"}.
    """
    onnx = Path(model).suffix.lower() == ".onnx"
    device = device or "auto"
    if onnx:
        if executor.name != "local":
            raise ValueError("an .onnx model scores in this process; give an .osad model to score on a cluster")
        load_model(model)  # checks the manifest's sha256 before anything starts
        fn, shared, gpu = onnx_batch, (str(model),), False
    else:
        load_model(model, "cpu")
        model_bytes = Path(model).read_bytes()
        gpu = device.startswith("cuda")
        if device == "auto" and executor.name == "ray":
            from .executors.ray import cluster_has_gpu

            gpu = cluster_has_gpu()
        fn, shared = score_batch, (model_bytes, hashlib.sha256(model_bytes).hexdigest(), device)
    batches = (paths[i:i + batch] for i in range(0, len(paths), batch))  # lazy: one batch made at a time
    progress = BatchProgress(len(paths), sink if sink is not None else line_sink(), verb="scored",
                             stage="Scoring")
    t0 = time.monotonic()
    done = scored = 0
    cancelled = False
    skipped: list = []
    scores: list[np.ndarray] = []
    f = open(csv_path, "w", newline="") if csv_path else open(os.devnull, "w")
    with f:
        writer = csv.writer(f)
        writer.writerow(["path", "score"] + (["verdict"] if threshold is not None else []))
        for ok, batch_scores, bad in executor.map(fn, batches, gpu=gpu, shared=shared):
            for path, s in zip(ok, batch_scores):
                row = [path, s] + (["anomaly" if s >= threshold else "normal"] if threshold is not None else [])
                writer.writerow(row)
                if echo:
                    print("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
            f.flush()
            scores.append(np.asarray(batch_scores, np.float32))
            scored += len(ok)
            skipped += bad
            done += len(ok) + len(bad)
            progress.update(done)
            if should_stop is not None and done < len(paths) and should_stop():
                cancelled = True
                break
    seconds = time.monotonic() - t0
    progress.update(done, force=True)
    if sink is None and sys.stderr.isatty():
        sys.stderr.write("\n")
    for _, why in skipped:
        print(f"skipped: {why}", file=sys.stderr)
    rate = scored / max(seconds, 1e-9)
    peak = peak_rss_mb()
    print(f"{'cancelled after scoring' if cancelled else 'scored'} {scored}/{len(paths)} images in {seconds:.1f} s: "
          f"{rate:.1f} images/s ({executor.name} executor), peak memory {peak:.0f} MiB"
          + (f"; wrote {csv_path}" if csv_path else ""), file=sys.stderr)
    return {"scored": scored, "skipped": len(skipped), "seconds": seconds, "images_per_s": rate,
            "scores": np.concatenate(scores) if scores else np.zeros(0, np.float32), "cancelled": cancelled,
            "peak_rss_mb": peak}


def scores_csv(data_dir: str | Path, job_id: int) -> Path:
    """Where the app's folder-scoring job ``job_id`` writes its rows."""
    return Path(data_dir) / "scores" / f"job_{int(job_id)}.csv"


def run_score_job(job_id: int, payload: dict) -> tuple[str, str | None]:
    """Body of a ``score`` job (Inspect → score a server folder): ``{"run_id",
    "model_path", "folder", "confine_to", "threshold"}``. Rows go to
    :func:`scores_csv` batch by batch, progress and ETA to the job row; a cancel stops
    after the current batch and keeps the rows written so far."""
    from db import data_dir, session_scope
    from db import queries as q

    from .batch_progress import job_sink
    from .data import load_folder
    from .executors import LocalExecutor

    def should_stop() -> bool:
        with session_scope() as s:
            return q.is_cancel_requested(s, job_id)

    sink = job_sink(job_id)
    sink({"message": "listing the folder…", "fraction": 0.0})
    paths = [r.path for r in load_folder(payload["folder"], confine_to=payload.get("confine_to")).records]
    out = scores_csv(data_dir(), job_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = score_paths(LocalExecutor(), payload["model_path"], paths, str(out), threshold=payload.get("threshold"),
                      device=payload.get("device") or "auto", echo=False, sink=sink, should_stop=should_stop)
    what = (f"scored {res['scored']:,} of {len(paths):,} images in {res['seconds']:.0f} s "
            f"({res['images_per_s']:.0f} images/s)" + (f"; {res['skipped']:,} unreadable" if res["skipped"] else ""))
    sink({"message": what, "scored": res["scored"], "skipped": res["skipped"], "csv": str(out),
          **({} if res["cancelled"] else {"fraction": 1.0})})
    if res["cancelled"]:
        return "cancelled", f"cancelled: {what}; the CSV holds those rows"
    return "done", None


__all__ = ["load_model", "onnx_batch", "peak_rss_mb", "run_score_job", "score_batch", "score_paths", "scores_csv"]

"""What every method's training shares: device, seeding, sampling, progress, cancel, checkpoints.

Resuming after a crash (``Callbacks.checkpoint_path`` + a :class:`Resumable` passed to
:func:`run_loop`), per method:

* DRA, DevNet, SaliencyCut (the DRA-family loop): resume after the last completed
  epoch, with model, optimiser, scheduler, data streams and every RNG restored, so the
  final metrics equal an uninterrupted run's;
* AHL: its stage 1 (the base model) resumes like DRA/DevNet, or is skipped when it had
  finished; the feature cache and the AHL heads are built again;
* BGAD, CKAAD: start again (their loops are not wired to checkpoints yet).
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .progress import Plan, Progress, Tracker

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


class TrainingCancelled(Exception):
    """Raised inside fit() when the callbacks ask to stop."""


def resolve_device(choice: str = "auto") -> torch.device:
    """CUDA when available, then Apple MPS, else CPU; an explicit choice must exist."""
    if choice not in DEVICES and not choice.startswith("cuda:"):
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICES)}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is available")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was requested but Apple MPS is not available")
    return torch.device(choice)


def describe_device(device: torch.device | str) -> str:
    """Human name, e.g. "CUDA · NVIDIA H100" or "CPU · 2 threads"."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"CUDA · {torch.cuda.get_device_name(idx)}"
    if device.type == "mps":
        return "MPS · Apple GPU"
    n = torch.get_num_threads()
    return f"CPU · {n} thread{'s' if n != 1 else ''}"


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; a CPU run with the same seed repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


class Callbacks:
    """Progress reporting and cancellation; the CLI, worker and tests subclass or pass functions.

    Progress is stage-aware (:mod:`osad_core.progress`): a job's plan of stages is set
    once (:meth:`plan`; the first caller wins, so the job's plan is not replaced by the
    training stages of the detector it runs), :meth:`begin` starts a stage and
    :meth:`advance` reports steps within it. ``on_progress`` gets a :class:`Progress`
    at most every ``every_s`` seconds, and always at a stage's start, an epoch's end and
    a :meth:`status` message.

    ``checkpoint_path``: where :func:`run_loop` keeps a resumable checkpoint of a method
    that supports it (written atomically after every epoch, read at the start);
    ``on_checkpoint(epochs_done)`` is told after each one is written.
    """

    def __init__(self, on_progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, every_s: float = 1.0,
                 checkpoint_path: str | os.PathLike | None = None,
                 on_checkpoint: Callable[[int], None] | None = None):
        self._on_progress = on_progress
        self._should_stop = should_stop
        self.every_s = every_s
        self.checkpoint_path = checkpoint_path
        self.on_checkpoint = on_checkpoint
        self.resumed_from: int | None = None  # epochs restored from a checkpoint, if any
        self.tracker = Tracker()
        self._last = 0.0

    def plan(self, stages: Plan, replace: bool = False) -> None:
        """Set the job's stages unless a plan was set already (or ``replace``)."""
        if replace or not self.tracker.planned:
            self.tracker.set_plan(stages)

    def begin(self, stage: str, total: int = 0, done: int = 0, message: str = "") -> None:
        """Start ``stage`` with ``total`` steps (``done`` of them already, e.g. after a resume)."""
        self.tracker.begin(stage, total, done)
        self.progress(self.tracker.snapshot(message=message), force=True)

    def advance(self, step: int, total: int | None = None, metrics: dict | None = None, force: bool = False,
                **fields) -> None:
        """``step`` of the current stage's ``total`` are done; ``metrics`` e.g. {"loss": 0.4};
        ``fields``: epoch, epochs, curve_point, message (see :class:`Progress`)."""
        if self._on_progress and (force or time.monotonic() - self._last >= self.every_s):
            self.progress(self.tracker.advance(step, total, metrics, **fields), force=True)
        else:  # between reports only the count moves (it sets the next report's ETA)
            self.tracker.step = int(step)
            if total is not None:
                self.tracker.total = int(total)

    def add(self, n: int) -> None:
        """``n`` more steps of the current stage are done."""
        self.advance(self.tracker.step + int(n))

    def progress(self, p: Progress, force: bool = False) -> None:
        now = time.monotonic()
        if self._on_progress and (force or now - self._last >= self.every_s):
            self._last = now
            self._on_progress(p)

    def status(self, message: str) -> None:
        """Say what is happening within the current stage (always reported)."""
        self.progress(self.tracker.snapshot(message=message), force=True)

    def check_cancel(self) -> None:
        if self._should_stop and self._should_stop():
            raise TrainingCancelled("training was cancelled")


@dataclass
class Resumable:
    """What a method's training loop changes between epochs, for checkpoints.

    ``get()`` returns tensors, numbers, strings, lists and dicts only (the file is read
    back with ``torch.load(weights_only=True)``); ``set(state)`` puts them back. ``key``
    names the method and configuration: a checkpoint written under another key is
    ignored. The loop itself saves Python's, NumPy's and torch's global RNGs.
    """

    get: Callable[[], dict]
    set: Callable[[dict], None]
    key: str


def _global_rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_global_rng_state(st: dict) -> None:
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    torch.set_rng_state(st["torch"])
    name, key, *rest = st["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))


def _plain(obj):
    """``obj`` with NumPy scalars and arrays as Python numbers and tensors: the restricted
    loader that reads checkpoints back refuses NumPy's own types (a loss history or a
    running statistic easily holds one)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, blob: dict) -> None:
    """Write atomically: a crash leaves the previous checkpoint or the new one, never half."""
    from .artefacts import atomic_path

    with atomic_path(path) as tmp:
        torch.save(_plain(blob), tmp)


def load_checkpoint(path: str | os.PathLike, key: str) -> dict | None:
    """The checkpoint at ``path`` if it exists, reads and was written under ``key``."""
    if not path or not os.path.isfile(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable: start again rather than fail the job
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        log.info("checkpoint %s belongs to another configuration; starting from scratch", path)
        return None
    return blob


class InfiniteStream:
    """Shuffled indices, re-permuted every time they run out (the few anomalies repeat)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self._perm: list[int] = []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self._perm:
                self._perm = list(self.rng.permutation(self.n))
            out.append(int(self._perm.pop()))
        return out


def run_loop(
    step_fn: Callable[[int, int], float],
    epochs: int,
    steps: int,
    callbacks: Callbacks | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    stage: str = "Training",
    resumable: Resumable | None = None,
    curve_offset: int = 0,
) -> list[dict]:
    """Run ``step_fn(epoch, step)`` for epochs x steps, reporting progress and honouring cancel.

    With ``resumable`` and ``callbacks.checkpoint_path`` the loop writes a checkpoint
    after every epoch and, when one is there at the start, continues after its last
    epoch with the state restored; the result equals an uninterrupted run's.
    Progress is reported as ``stage`` with epochs x steps steps; each epoch's end is a
    point ``curve_offset + epoch`` of the job's loss curve. Returns the per-epoch mean
    loss history.
    """
    cb = callbacks or Callbacks()
    ckpt_path = cb.checkpoint_path if resumable is not None else None
    t0 = time.monotonic()
    history: list[dict] = []
    first = 0
    blob = load_checkpoint(ckpt_path, resumable.key) if ckpt_path else None
    if blob is not None:
        resumable.set(blob["state"])
        _set_global_rng_state(blob["rng"])
        history, first = list(blob["history"]), int(blob["epoch"])
        t0 -= float(blob.get("elapsed_s", 0.0))
        cb.resumed_from = first
        log.info("resuming after epoch %d/%d from %s", first, epochs, ckpt_path)
    total = epochs * steps
    cb.begin(stage, total, done=first * steps)
    for epoch in range(first, epochs):
        if on_epoch_start:
            on_epoch_start(epoch)
        losses = []
        for step in range(steps):
            cb.check_cancel()
            loss = float(step_fn(epoch, step))
            if not np.isfinite(loss):
                raise FloatingPointError(f"training diverged (loss {loss}) at epoch {epoch + 1}, step {step + 1}")
            losses.append(loss)
            end = step == steps - 1
            # epoch ends are always reported: the worker's loss log keeps one point per epoch
            cb.advance(epoch * steps + step + 1, total, {"loss": loss}, force=end, epoch=epoch, epochs=epochs,
                       curve_point=curve_offset + epoch if end else None)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "elapsed_s": time.monotonic() - t0})
        log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, history[-1]["loss"])
        if ckpt_path:
            save_checkpoint(ckpt_path, {"key": resumable.key, "epoch": epoch + 1, "history": history,
                                        "elapsed_s": time.monotonic() - t0, "state": resumable.get(),
                                        "rng": _global_rng_state()})
            if cb.on_checkpoint:
                cb.on_checkpoint(epoch + 1)
    return history


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))

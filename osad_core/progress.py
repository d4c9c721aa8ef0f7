"""One progress model for every job: named stages, each with its own step counter.

A job is a plan of stages (a method's training stages, then scoring, saving, heatmaps
and the t-SNE map). Whoever does the work says which stage it is in
(:meth:`Tracker.begin`) and how far it got (:meth:`Tracker.advance`); the tracker turns
that into a :class:`Progress`: "Stage 2/5 · Feature cache · 40/120 · ETA 0:35". The
same object feeds the worker's job row, the Train page and the command line.

Metrics that are not finite (a stage with no loss, a diverging step) are left out, so
nobody ever reads "nan".
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

Plan = Sequence["str | tuple[str, float]"]


def finite_metrics(metrics: dict | None) -> dict[str, float]:
    """The metrics that are finite numbers, as floats; anything else is left out."""
    out = {}
    for k, v in (metrics or {}).items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[str(k)] = v
    return out


@dataclass
class Progress:
    stage: str  # e.g. "Feature cache"
    stage_index: int  # 1-based position in the job's plan
    stage_count: int
    step: int  # work done within the stage
    total: int  # work of the stage (0: unknown)
    elapsed_s: float  # since the job (or the training) started
    stage_elapsed_s: float
    eta_s: float | None  # of the stage; None until a step has been timed
    fraction: float  # of the whole job, by the plan's stage weights
    metrics: dict[str, float] = field(default_factory=dict)  # finite values only
    epoch: int | None = None  # epoch loops: 0-based epoch of this step
    epochs: int | None = None
    curve_point: int | None = None  # set at an epoch end: x of this point on the job's loss curve
    message: str = ""

    def __post_init__(self) -> None:
        self.metrics = finite_metrics(self.metrics)

    @property
    def loss(self) -> float | None:
        return self.metrics.get("loss")

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return progress_text(self.to_dict())


def clock(seconds: float | None) -> str:
    """0:35, 12:04, 1:02:09."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_text(p: dict) -> str:
    """One line from a stored progress dict: "Stage 2/3 · Feature cache · 40/120 · ETA 0:35".

    Reads what :meth:`Progress.to_dict` wrote; missing parts are left out, never shown
    as "nan" or "None"."""
    if not p or not p.get("stage"):
        return str(p.get("message") or "starting…") if p else "starting…"
    parts = []
    if p.get("stage_count"):
        parts.append(f"Stage {p.get('stage_index', 1)}/{p['stage_count']}")
    parts.append(str(p["stage"]))
    if p.get("total"):
        parts.append(f"{int(p.get('step') or 0):,}/{int(p['total']):,}")
    if p.get("epochs"):
        parts.append(f"epoch {int(p.get('epoch') or 0) + 1}/{int(p['epochs'])}")
    for k, v in finite_metrics(p.get("metrics")).items():
        parts.append(f"{k} {v:.4g}")
    if p.get("eta_s") is not None and p.get("total") and int(p.get("step") or 0) < int(p["total"]):
        parts.append(f"ETA {clock(p['eta_s'])}")
    if p.get("message"):
        parts.append(str(p["message"]))
    return " · ".join(parts)


class Tracker:
    """The stages of one job and where it stands; makes :class:`Progress` objects.

    ``plan``: stage names, or (name, weight) pairs where the weight is the stage's
    expected share of the job's time (used for the overall fraction only). A stage that
    is not in the plan is added at the end, so an unplanned stage still reports.
    """

    def __init__(self, plan: Plan = ()):
        self.names: list[str] = []
        self.weights: list[float] = []
        self.set_plan(plan)
        self.t0 = time.monotonic()
        self.index = -1
        self.step = 0
        self.total = 0
        self._stage_t0 = self.t0
        self._stage_step0 = 0  # steps already done when this stage (re)started, e.g. after a resume

    @property
    def planned(self) -> bool:
        return bool(self.names)

    def set_plan(self, plan: Plan) -> None:
        self.names, self.weights = [], []
        for item in plan:
            name, w = (item, 1.0) if isinstance(item, str) else (item[0], float(item[1]))
            self.names.append(name)
            self.weights.append(max(0.0, w))

    def begin(self, stage: str, total: int = 0, done: int = 0) -> None:
        if stage not in self.names:
            self.names.append(stage)
            self.weights.append(1.0)
        self.index = self.names.index(stage)
        self.step, self.total = int(done), int(total)
        self._stage_t0, self._stage_step0 = time.monotonic(), int(done)

    @property
    def stage_start_step(self) -> int:
        """Steps counted as done when the stage began (e.g. found already done by a resume);
        the stage's rate and ETA leave them out."""
        return self._stage_step0

    @stage_start_step.setter
    def stage_start_step(self, n: int) -> None:
        self._stage_step0 = int(n)

    def advance(self, step: int, total: int | None = None, metrics: dict | None = None,
                epoch: int | None = None, epochs: int | None = None, curve_point: int | None = None,
                message: str = "") -> Progress:
        if self.index < 0:
            self.begin("Working", total or 0)
        self.step = int(step)
        if total is not None:
            self.total = int(total)
        return self.snapshot(metrics, epoch, epochs, curve_point, message)

    def snapshot(self, metrics: dict | None = None, epoch: int | None = None, epochs: int | None = None,
                 curve_point: int | None = None, message: str = "") -> Progress:
        if self.index < 0:
            self.begin("Starting")
        now = time.monotonic()
        stage_el = now - self._stage_t0
        done_here = self.step - self._stage_step0
        eta = None
        if self.total and done_here > 0:
            eta = stage_el / done_here * max(0, self.total - self.step)
        within = min(1.0, self.step / self.total) if self.total else 0.0
        wsum = sum(self.weights) or 1.0
        frac = (sum(self.weights[:self.index]) + self.weights[self.index] * within) / wsum
        return Progress(self.names[self.index], self.index + 1, len(self.names), self.step, self.total,
                        now - self.t0, stage_el, eta, min(1.0, frac), finite_metrics(metrics), epoch, epochs,
                        curve_point, message)

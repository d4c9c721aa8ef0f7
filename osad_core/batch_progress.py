"""Progress of work done in batches (an import, bulk scoring): count, rate and ETA.

One helper for every long batch job, over the one progress model of every job
(:mod:`osad_core.progress`): the row carries the same stage, step, total, fraction and
ETA as a training job's, plus ``done``, ``rate`` and a sentence (``message``). Where the numbers
go is a *sink*: a job row (:func:`job_sink`), a terminal line (:func:`line_sink`), or
any callable taking the dict.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from .progress import Tracker

Sink = Callable[[dict[str, Any]], None]


class BatchProgress:
    """Call :meth:`update` after each batch; the sink hears at most every ``every_s``
    seconds (always at the start and with ``force``). The numbers come from the one
    stage-aware model (:class:`osad_core.progress.Tracker`, a plan of one stage), so a
    batch job's row reads like a training job's; on top it adds the count, the rate and
    a sentence for the page. The ETA is the remaining count at the mean rate of this
    run's work so far (items skipped without work, e.g. those an interrupted import
    already stored, are counted in ``done`` but not in the rate)."""

    def __init__(self, total: int, sink: Sink | None, what: str = "images", verb: str = "done",
                 every_s: float = 1.0, already: int = 0, stage: str = "Working"):
        self.total, self.sink, self.what, self.verb, self.every_s = int(total), sink, what, verb, every_s
        self.tracker = Tracker([stage])
        self.tracker.begin(stage, self.total, done=int(already))
        self.last = float("-inf")
        self.done = int(already)

    @property
    def already(self) -> int:
        """Items counted as done without work (e.g. found stored by a resumed import)."""
        return self.tracker.stage_start_step

    @already.setter
    def already(self, n: int) -> None:
        self.tracker.stage_start_step = n

    def fields(self) -> dict[str, Any]:
        p = self.tracker.advance(self.done, self.total).to_dict()
        worked = self.done - self.already
        rate = worked / p["stage_elapsed_s"] if p["stage_elapsed_s"] > 0 and worked > 0 else None
        msg = f"{self.done:,} of {self.total:,} {self.what} {self.verb}"
        if rate:
            msg += f" · {rate:,.0f} {self.what}/s"
        p.update(done=self.done, fraction=self.done / self.total if self.total else 1.0,
                 elapsed_s=round(p["elapsed_s"], 2), eta_s=None if p["eta_s"] is None else round(p["eta_s"], 3),
                 rate=None if rate is None else round(rate, 2), message=msg)
        return p

    def update(self, done: int, force: bool = False) -> None:
        self.done = int(done)
        now = time.monotonic()
        if self.sink is None or (not force and now - self.last < self.every_s):
            return
        self.last = now
        self.sink(self.fields())


def line_sink(out=None) -> Sink:
    """A progress line on a terminal (redrawn in place) or a line every call elsewhere."""
    out = out or sys.stderr
    tty = out.isatty()

    def show(p: dict[str, Any]) -> None:
        width = 30
        bar = "#" * int(width * p["fraction"])
        eta = f"  ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None else ""
        line = f"[{bar:<{width}}] {p['message']}{eta}"
        out.write(("\r" + line + "\033[K") if tty else line + "\n")
        out.flush()

    return show


def job_sink(job_id: int, url: str | None = None) -> Sink:
    """Progress into the job's row (best effort: a busy database skips one update).
    ``progress_at`` tells the worker's supervisor the job is alive."""
    def write(p: dict[str, Any]) -> None:
        from db import queries as q
        from db.retry import with_retry

        fields = {**p, "progress_at": time.time()}
        with_retry(lambda s: q.update_job_progress(s, job_id, **fields), url=url, deadline_s=10,
                   what="progress update", give_up=None)

    return write


__all__ = ["BatchProgress", "Sink", "job_sink", "line_sink"]

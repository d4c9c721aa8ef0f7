"""Progress of work done in batches (an import, bulk scoring): count, rate and ETA.

One helper for every long batch job, so all of them report the same fields the job
rows already carry (``done``, ``total``, ``fraction``, ``elapsed_s``, ``eta_s``,
``message``) and a change of the progress model touches one place. Where the numbers
go is a *sink*: a job row (:func:`job_sink`), a terminal line (:func:`line_sink`), or
any callable taking the dict.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Sink = Callable[[dict[str, Any]], None]


class BatchProgress:
    """Call :meth:`update` after each batch; the sink hears at most every ``every_s``
    seconds (always at the start and with ``force``). The ETA is the remaining count
    at the mean rate of this run's work so far (items skipped without work, e.g. those
    an interrupted import already stored, are counted in ``done`` but not in the rate)."""

    def __init__(self, total: int, sink: Sink | None, what: str = "images", verb: str = "done",
                 every_s: float = 1.0, already: int = 0):
        self.total, self.sink, self.what, self.verb, self.every_s = int(total), sink, what, verb, every_s
        self.already = int(already)
        self.t0 = time.monotonic()
        self.last = float("-inf")
        self.done = self.already

    def fields(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        worked = self.done - self.already
        rate = worked / elapsed if elapsed > 0 and worked > 0 else None
        left = max(0, self.total - self.done)
        eta = left / rate if rate else None
        msg = f"{self.done:,} of {self.total:,} {self.what} {self.verb}"
        if rate:
            msg += f" · {rate:,.0f} {self.what}/s"
        return {"done": self.done, "total": self.total, "fraction": self.done / self.total if self.total else 1.0,
                "elapsed_s": round(elapsed, 2), "eta_s": None if eta is None else round(eta, 1),
                "rate": None if rate is None else round(rate, 2), "message": msg}

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

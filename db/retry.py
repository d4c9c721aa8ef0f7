"""Short write transactions, retried when the database is momentarily busy.

SQLite allows one writer at a time: a writer that finds the lock taken waits up to the
busy timeout, and one that tries to upgrade a read transaction after someone else wrote
fails at once with "database is locked". PostgreSQL aborts one side of a serialization
conflict or deadlock (SQLSTATE 40001 / 40P01). Both are transient: running the whole
transaction again is the documented remedy. :func:`with_retry` does that with
exponential backoff and jitter, so concurrent writers spread out instead of colliding
again in lockstep.

Callers keep transactions short (decode, hash and encode *before* calling) and choose
what running out of retries means: progress and heartbeat writes pass
``give_up=None`` and are skipped with a log line, so a busy database never fails a job
by itself; a job's final status write passes a long ``deadline_s``.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL: serialization_failure, deadlock_detected, lock_not_available
_RETRY_SQLSTATES = {"40001", "40P01", "55P03"}


def is_transient(exc: BaseException) -> bool:
    """Whether running the same transaction again may succeed."""
    if not isinstance(exc, DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    if isinstance(exc, OperationalError):
        msg = str(exc.orig).lower()
        return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg
    return False


def with_retry(
    fn: Callable[[Session], T],
    *,
    url: str | None = None,
    deadline_s: float = 60.0,
    base_s: float = 0.05,
    max_sleep_s: float = 2.0,
    what: str = "database write",
    give_up: str | None = "raise",
) -> T | None:
    """Run ``fn(session)`` in one transaction; run it again on a transient error.

    Retries until ``deadline_s`` has passed since the first try (sleeping base_s, 2x, 4x
    ... capped at ``max_sleep_s``, each scaled by a random factor 0.5..1.5). Other
    errors propagate at once. After the deadline the last transient error is raised, or
    with ``give_up=None`` logged and ``None`` returned.
    """
    from .engine import session_scope

    t0 = time.monotonic()
    delay = base_s
    attempt = 0
    while True:
        attempt += 1
        try:
            with session_scope(url) as s:
                return fn(s)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() - t0 + delay > deadline_s:
                if give_up is None:
                    log.warning("%s skipped after %d tries: %s", what, attempt, exc.orig)
                    return None
                raise
            log.info("%s: %s; retry %d in %.2f s", what, exc.orig, attempt, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, max_sleep_s)

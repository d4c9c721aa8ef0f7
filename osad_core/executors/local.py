"""The default executor: jobs run as child processes of the local worker; ``map`` runs in
this process, one item after the other."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .base import Executor, JobHandle

REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalJob(JobHandle):
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def ended_how(self, rc: int) -> str:
        return super().ended_how(rc) + "; see worker.log"


class LocalExecutor(Executor):
    name = "local"

    def start_job(self, job_id: int, worker_id: str, payload: dict) -> LocalJob:
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see worker.ensure_local_worker
        verbose = ["-v"] if logging.getLogger().isEnabledFor(logging.INFO) else []
        return LocalJob(subprocess.Popen(
            [sys.executable, "-m", "osad_core", *verbose, "worker", "--job", str(job_id), "--worker-id", worker_id],
            stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT), env=env,
        ))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, gpu: bool = False,
            shared: tuple = ()) -> Iterator[Any]:
        for item in items:
            yield fn(*shared, item)

"""What every executor offers: run a claimed job somewhere, and map a function over items.

Job state lives in the database; an executor only decides *where* code runs. The worker's
supervisor (:func:`osad_core.worker.supervise`) watches a job the same way whoever runs it:
it polls the job's handle and the job row, and kills the handle when a limit or a cancel
says so. Pages never know which executor ran a job.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class JobHandle(ABC):
    """One running job: like a process, it can be waited for and killed."""

    @abstractmethod
    def wait(self, timeout: float) -> int | None:
        """The job's exit code once it ended (0 = it finished its row itself), else None
        after ``timeout`` seconds."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the job now and wait until it is gone."""

    def ended_how(self, rc: int) -> str:
        """Why a job ended without finishing its row, for the job's error message."""
        return f"signal {-rc}" if rc < 0 else f"code {rc}"


class Executor(ABC):
    name: str = ""

    @abstractmethod
    def start_job(self, job_id: int, worker_id: str, payload: dict) -> JobHandle:
        """Start ``python -m osad_core worker --job N``'s work for a job claimed by ``worker_id``."""

    def capacity(self) -> int:
        """How many jobs may run at once."""
        return 1

    @abstractmethod
    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, gpu: bool = False,
            shared: tuple = ()) -> Iterator[Any]:
        """``fn(*shared, item)`` for each item; results in the items' order, as they come.

        ``shared`` holds large arguments every call gets (a dataset, a model file): an
        executor ships them once."""

    def close(self) -> None:
        pass

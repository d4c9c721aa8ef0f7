"""Who runs a job: the local worker (default) or a Ray cluster (``OSAD_RAY_ADDRESS``)."""
from __future__ import annotations

import os

from .base import Executor, JobHandle
from .local import LocalExecutor

RAY_ADDRESS_ENV = "OSAD_RAY_ADDRESS"


def ray_address(cli_value: str | None = None) -> str | None:
    """The Ray cluster to use: ``--ray ADDRESS``, else ``OSAD_RAY_ADDRESS``, else none."""
    return cli_value or os.environ.get(RAY_ADDRESS_ENV) or None


def get_executor(address: str | None = None) -> Executor:
    """The Ray executor for ``address`` (``local`` starts a cluster in this process), else the local one."""
    if not address:
        return LocalExecutor()
    from .ray import RayExecutor

    return RayExecutor(address)


__all__ = ["Executor", "JobHandle", "LocalExecutor", "RAY_ADDRESS_ENV", "get_executor", "ray_address"]

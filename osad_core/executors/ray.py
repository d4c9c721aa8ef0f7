"""The Ray executor: training jobs, benchmark cells and scoring batches as Ray tasks.

Set-up for a team (README, "For a team"): ``ray start --head`` on one machine, ``ray start
--address HEAD:6379`` on each GPU machine, all with Ray's token authentication
(``RAY_AUTH_MODE=token`` and the cluster's token file), OSAD Studio installed at the same
path on every machine, PostgreSQL as ``OSAD_DATABASE_URL`` and ``OSAD_DATA_DIR`` on shared
storage.

The database URL holds its password, so it never travels with a task: Ray keeps a task's
runtime environment in its control store, where anyone who can reach the cluster reads it.
Every machine sets ``OSAD_DATABASE_URL`` and ``OSAD_DATA_DIR`` in the environment its
``ray start`` runs in (Ray's worker processes inherit it); a job task receives only the job
id and fails with one sentence where they are missing (:func:`machine_settings`). The
runtime environment carries the rest of this process's ``OSAD_*`` settings (limits, pool
sizes), the OpenMP settings and the code path. A training job's
task is the job process of the local worker (:func:`osad_core.worker.run_job_process`),
in a fresh Ray worker process per job (``max_calls=1``: a finished job returns all of its
memory, CUDA context included). Ray never retries a job task: whether a job is re-run is
the database's re-queue rule, as for the local worker.
"""
from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .base import Executor, JobHandle
from .local import REPO_ROOT

log = logging.getLogger(__name__)

CPUS_PER_TASK_ENV = "OSAD_RAY_CPUS_PER_TASK"
DATABASE_URL_ENV = "OSAD_DATABASE_URL"
DATA_DIR_ENV = "OSAD_DATA_DIR"
# Settings each machine has of its own; never copied into a task's runtime environment.
MACHINE_OWN = (DATABASE_URL_ENV, DATA_DIR_ENV, "OSAD_RAY_ADDRESS", "OSAD_TEST_POSTGRES_URL")


class RayUnavailable(ValueError):
    """Ray is not installed or the cluster cannot be reached (one sentence for the user)."""


class MachineNotConfigured(RuntimeError):
    """A Ray machine lacks the database URL or data folder (one sentence for the job's error)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("Ray is not installed: pip install -r requirements-cluster.txt") from None
    return ray


def connect(address: str) -> bool:
    """Join the cluster at ``address`` (``local``: start one in this process) unless this
    process already has. Returns True when this call connected."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    try:
        if address == "local":
            # The cluster's processes are this process's children and inherit its environment:
            # its database and data folder are theirs, as ``ray start`` gives them on a team.
            from db import data_dir, database_url

            os.environ.setdefault(DATABASE_URL_ENV, database_url())
            os.environ.setdefault(DATA_DIR_ENV, str(data_dir().resolve()))
            ray.init(_node_ip_address="127.0.0.1", **kw)
        else:
            ray.init(address=address, **kw)
    except ConnectionError as exc:
        # Ray reports a missing or wrong cluster token the same way (its log says which).
        raise RayUnavailable(f"cannot reach the Ray cluster at {address} (is this machine's RAY_AUTH_MODE=token "
                             f"and RAY_AUTH_TOKEN_PATH the cluster's token?): {exc}") from None
    return True


def task_env() -> dict:
    """The runtime environment of every task: this process's ``OSAD_*`` and thread settings
    and OSAD Studio's code on the path; not the database URL, data folder or cluster address
    (:data:`MACHINE_OWN`), which each machine has in its own environment."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OSAD_", "OMP_", "MKL_")) and k not in MACHINE_OWN}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


def machine_settings() -> tuple[str, str]:
    """This Ray machine's database URL and data folder, from its own environment."""
    missing = [k for k in (DATABASE_URL_ENV, DATA_DIR_ENV) if not os.environ.get(k)]
    if missing:
        raise MachineNotConfigured(
            f"the Ray machine {socket.gethostname()} has no {' and no '.join(missing)}: set them in the "
            "environment `ray start` runs in on that machine (README, \"For a team\")")
    return os.environ[DATABASE_URL_ENV], os.environ[DATA_DIR_ENV]


def cpus_per_task() -> float:
    try:
        return float(os.environ.get(CPUS_PER_TASK_ENV) or 1)
    except ValueError:
        return 1.0


def _resources(gpu: bool) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_task()}


def cluster_has_gpu() -> bool:
    return _ray().cluster_resources().get("GPU", 0) >= 1


def wants_gpu(payload: dict) -> bool:
    """A job asks Ray for a GPU when its device is CUDA, or ``auto`` on a cluster with GPUs."""
    device = str((payload.get("overrides") or {}).get("device") or "auto")
    if device.startswith("cuda"):
        return True
    return device == "auto" and cluster_has_gpu()


def _run_job_task(job_id: int, worker_id: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    machine_settings()
    from ..allocator import tune
    from ..worker import run_job_process

    tune()  # the task runs in a process of its own (max_calls=1), like a local job process
    return run_job_process(job_id, worker_id)


def _apply(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class RayJob(JobHandle):
    def __init__(self, ref):
        self.ref = ref
        self.why: str | None = None

    def wait(self, timeout: float) -> int | None:
        ray = _ray()
        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            return None
        try:
            return int(ray.get(self.ref))
        except ray.exceptions.TaskCancelledError:
            self.why = "its Ray task was cancelled"
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MachineNotConfigured):
                self.why = str(cause)
            else:
                first = str(cause or exc).strip().splitlines()
                self.why = f"its Ray task failed: {type(cause or exc).__name__}{': ' + first[0][:200] if first else ''}"
        except ray.exceptions.RayError as exc:  # the worker process or its machine died
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.why = f"its Ray worker died: {type(exc).__name__}{': ' + first[:200] if first else ''}"
        return -9

    def kill(self, settle_s: float = 5.0) -> None:
        ray = _ray()
        # A task that has just written its final status ends by itself within moments;
        # cancelling a task while it completes can crash this process (a Ray 2.60
        # "Tried to complete task that was not pending" check), so cancel only one that
        # is still running after ``settle_s``.
        if ray.wait([self.ref], timeout=settle_s)[0]:
            return
        try:
            ray.cancel(self.ref, force=True)
        except Exception as exc:  # finished meanwhile
            log.info("ray.cancel: %s", exc)
        ray.wait([self.ref], timeout=30)

    def ended_how(self, rc: int) -> str:
        return self.why or super().ended_how(rc)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str = "local"):
        self.address = address
        self.owns = connect(address)

    def start_job(self, job_id: int, worker_id: str, payload: dict) -> RayJob:
        ray = _ray()
        task = ray.remote(max_calls=1, max_retries=0)(_run_job_task).options(
            runtime_env=task_env(), name=f"osad-job-{job_id}", **_resources(wants_gpu(payload)),
        )
        return RayJob(task.remote(job_id, worker_id))

    def capacity(self) -> int:
        res = _ray().cluster_resources()
        gpus = int(res.get("GPU", 0))
        return max(1, gpus or int(res.get("CPU", 1) // cpus_per_task()))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, gpu: bool = False,
            shared: tuple = ()) -> Iterator[Any]:
        ray = _ray()
        refs = [ray.put(x) for x in shared]  # once into the object store, not once per task
        task = ray.remote(_apply).options(runtime_env=task_env(), **_resources(gpu))
        window = 2 * self.capacity()  # enough queued to keep every worker busy, bounded memory
        pending: deque = deque()
        for item in items:
            pending.append(task.remote(fn, *refs, item))
            if len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        if self.owns:
            _ray().shutdown()

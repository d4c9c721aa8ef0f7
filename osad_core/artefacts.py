"""Files a training job leaves in the data folder, written so a crash never leaves half of one.

* ``models/run_<run id>.osad``: the model of a run; it counts only once a ``done`` run
  refers to it (the worker writes the file first, then commits the run).
* ``checkpoints/job_<job id>.pt``: the resumable state of a job's training loop; it
  lives while the job is queued or running.
* ``.<name>.<host>.<pid>.tmp`` next to either: a file being written. It becomes the
  real name with ``os.replace`` (atomic on POSIX and Windows), so readers see the old
  file or the new one. The writer's host and pid in the name let a sweep tell a
  file still being written from one left by a dead process.

:func:`sweep` (run when a worker starts) removes what no live job or done run owns.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$")
_RUN_FILE = re.compile(r"^run_(\d+)\.")
_JOB_FILE = re.compile(r"^job_(\d+)\.")
STALE_TMP_S = 24 * 3600  # another host's temp file is left alone for a day


def _host() -> str:
    return socket.gethostname().split(".")[0].replace(".", "_") or "host"


def models_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models"


def checkpoints_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "checkpoints"


def model_path(data_dir: str | os.PathLike, run_id: int) -> Path:
    return models_dir(data_dir) / f"run_{run_id}.osad"


def checkpoint_path(data_dir: str | os.PathLike, job_id: int) -> Path:
    return checkpoints_dir(data_dir) / f"job_{job_id}.pt"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` atomically,
    on error it is removed (a full disk leaves nothing partial behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as f:  # the data reaches the disk before the name does
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_is_orphan(p: Path) -> bool:
    m = _TMP.match(p.name)
    if m is None:
        return False
    if m["host"] == _host():
        return not pid_alive(int(m["pid"]))
    try:
        return time.time() - p.stat().st_mtime > STALE_TMP_S
    except FileNotFoundError:
        return False


def discard_job_files(data_dir: str | os.PathLike, job_id: int | None, run_id: int | None) -> None:
    """Remove the checkpoint of a job and the model file of its (unfinished) run."""
    paths = []
    if job_id is not None:
        paths.append(checkpoint_path(data_dir, job_id))
    if run_id is not None:
        paths.append(model_path(data_dir, run_id))
    for p in paths:
        p.unlink(missing_ok=True)


def sweep(data_dir: str | os.PathLike, done_models: set[str], active_runs: set[int],
          active_jobs: set[int]) -> list[Path]:
    """Remove orphans: temp files of dead writers, model files no done run refers to
    (unless their run has a live job) and checkpoints of jobs no longer live.
    Returns the removed paths."""
    removed = []
    done = {os.path.realpath(p) for p in done_models}
    for folder, pattern, active in ((models_dir(data_dir), _RUN_FILE, active_runs),
                                    (checkpoints_dir(data_dir), _JOB_FILE, active_jobs)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if not p.is_file():
                continue
            if p.name.endswith(".tmp"):
                orphan = _tmp_is_orphan(p)
            else:
                m = pattern.match(p.name)
                if m is None:
                    continue  # not ours
                owner_live = int(m[1]) in active
                orphan = not owner_live and (folder.name == "checkpoints" or os.path.realpath(p) not in done)
            if orphan:
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.warning("removed %d orphaned file(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed

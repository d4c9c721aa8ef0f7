"""Importing a folder of images into a project in batches: resumable, with progress and ETA.

Made for folders of any size (100,000 files and more). The folder is listed once (names
only); then, batch by batch, the paths the project already holds are skipped before any
file is opened, so an interrupted import resumes where it stopped without reading
again what is stored. The other files pass the guarded reader (header limits, a decode
at reduced size that finds truncated files, SHA-1) and each batch is stored in one
short transaction with its label events. Each file's grid thumbnail is made in its
batch from the decode that checks it (``thumbs=True``), so the Label page only reads
files and the batch's progress and ETA include that work.

This is glue between the library and the database (like :mod:`osad_core.store`): the
app's import job (:func:`run_import_job`, job kind ``import``) and the ``import``
command call the same :func:`import_dataset`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .batch_progress import BatchProgress, Sink
from .data import Dataset, describe_dataset, load_folder

log = logging.getLogger(__name__)

BATCH = 500  # files per transaction: short writes, a few hundred ms of reading between them


ANALYZE_EVERY = 20  # batches between refreshes of PostgreSQL's planner statistics


def _refresh_stats(url: str | None) -> None:
    from db import queries as q
    from db import session_scope
    from db.models import Image, LabelEvent

    with session_scope(url) as s:
        q.refresh_planner_stats(s, Image, LabelEvent)


class ImportCancelled(Exception):
    """The import was asked to stop; what was stored stays, and a re-run continues."""


@dataclass
class ImportResult:
    total: int  # files listed
    added: int  # stored by this run
    already: int  # stored before (a resumed import skips them unread)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) unreadable
    seconds: float = 0.0

    def sentence(self) -> str:
        rate = self.added / self.seconds if self.seconds > 0 else 0.0
        s = f"imported {self.added:,} of {self.total:,} files in {self.seconds:.1f} s ({rate:,.0f} files/s)"
        if self.already:
            s += f"; {self.already:,} were already in the project"
        if self.skipped:
            s += f"; skipped {len(self.skipped):,} unreadable, e.g. {self.skipped[0][1]}"
        return s


def import_dataset(project_id: int, ds: Dataset, *, url: str | None = None, author: str = "import",
                   decode: bool = True, thumbs: bool = True, batch: int = BATCH, sink: Sink | None = None,
                   should_stop: Callable[[], bool] | None = None) -> ImportResult:
    """Store ``ds``'s images in the project, ``batch`` files per transaction, with
    their thumbnails under the data directory when ``thumbs``.

    Raises :class:`ImportCancelled` between batches when ``should_stop()`` says so.
    """
    from db import data_dir, session_scope
    from db import queries as q
    from db.retry import with_retry

    from .store import image_items

    thumbs_dir = data_dir() / "thumbs" if thumbs else None

    t0 = time.monotonic()
    recs = ds.records
    progress = BatchProgress(len(recs), sink, what="files", verb="imported", stage="Import")
    progress.update(0, force=True)
    res = ImportResult(len(recs), 0, 0, list(ds.skipped))
    for i in range(0, len(recs), batch):
        if should_stop is not None and should_stop():
            progress.update(i, force=True)
            raise ImportCancelled(f"import stopped after {i:,} of {len(recs):,} files; run it again to continue")
        chunk = recs[i:i + batch]
        with session_scope(url) as s:
            known = q.known_paths(s, project_id, [r.path for r in chunk])
        todo = [r for r in chunk if r.path not in known]
        items = image_items(todo, ds.root, skipped=res.skipped, decode=decode, thumbs_dir=thumbs_dir)
        if items:
            res.added += with_retry(lambda s, items=items: q.add_images(s, project_id, items, author=author),
                                    url=url, what="storing imported images")
        res.already += len(known)
        progress.already = res.already  # skipped unread: not part of the rate
        progress.update(i + len(chunk), force=i + batch >= len(recs))
        if res.added and (i // batch) % ANALYZE_EVERY == 0:
            _refresh_stats(url)
    if res.added:
        _refresh_stats(url)  # the Label page's plans should know the project's new size at once
    res.seconds = time.monotonic() - t0
    return res


def run_import_job(job_id: int, payload: dict) -> tuple[str, str | None]:
    """Body of an ``import`` job: ``{"project_id", "folder", "confine_to", "author"}``.

    Progress (files, rate, ETA) goes to the job row; ``checkpoint_epoch`` counts the
    files stored, so a job whose worker died mid-import is re-queued and resumes, and
    is given up only after attempts that stored nothing new.
    """
    from db import queries as q
    from db import session_scope

    from .batch_progress import job_sink

    to_job = job_sink(job_id)

    def sink(p: dict) -> None:
        to_job({**p, "checkpoint_epoch": p["done"]})

    def should_stop() -> bool:
        with session_scope() as s:
            return q.is_cancel_requested(s, job_id)

    to_job({"message": "listing the folder…", "fraction": 0.0})  # 100,000 names take seconds
    ds = load_folder(payload["folder"], confine_to=payload.get("confine_to"))
    pid = int(payload["project_id"])
    try:
        res = import_dataset(pid, ds, author=payload.get("author") or "import",
                             sink=sink, should_stop=should_stop)
    except ImportCancelled as exc:
        return "cancelled", str(exc)
    bad = {p for p, _ in res.skipped}
    readable = replace(ds, records=[r for r in ds.records if r.path not in bad])
    with session_scope() as s:  # what the project holds, as an import in the page describes it
        q.set_project_description(s, pid, f"from {ds.root}: {describe_dataset(readable)}")
    to_job({"message": res.sentence(), "fraction": 1.0, "skipped": len(res.skipped)})
    return "done", None


__all__ = ["BATCH", "ImportCancelled", "ImportResult", "import_dataset", "run_import_job"]

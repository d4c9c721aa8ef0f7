"""Creating and deleting projects: a server folder, uploaded images or a zip, the ELPV demo.

Everything from outside goes through the guarded reader (:mod:`osad_core.safeio`): server
folders only below the import roots, zips streamed under limits, every image checked and
decoded once. A file that fails is skipped and named in the notes; it never stops the
others and leaves no file or row behind. The project and its images are written in one
database transaction, so bad input (no readable image, a folder that may not be read)
leaves no half-created project behind.
Errors are :class:`IngestError` (or the library's ``DataError``) with a one-sentence
message meant for the user as it is.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from db import data_dir, session_scope
from db import queries as q
from osad_core.data import (
    IMAGE_EXTENSIONS,
    DataError,
    Dataset,
    describe_dataset,
    file_sha1,
    import_elpv,
    load_folder,
    more_images_than,
)
from osad_core.safeio import confined_folder, extract_zip, is_image_name, read_image

log = logging.getLogger(__name__)

ELPV_DEMO_NAME = "ELPV solar cells (demo)"
ACCEPTED = " ".join(IMAGE_EXTENSIONS[:5])
UPLOAD_TYPES = [e.lstrip(".") for e in IMAGE_EXTENSIONS] + ["zip"]


class IngestError(ValueError):
    """Bad input for a new project; the message is shown to the user as it is."""


@dataclass
class Created:
    project_id: int
    name: str
    images: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    job_id: int | None = None  # a large folder goes on importing in this background job


# A server folder with more files than this is imported by a background job (batches,
# progress and ETA, resumable); a smaller one is read while the page waits, as an upload is.
IN_PAGE_MAX = int(os.environ.get("OSAD_IMPORT_IN_PAGE_MAX", "2000"))


def uploads_dir() -> Path:
    return data_dir() / "uploads"


def _quote_list(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(f"`{x}`" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_name_free(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise IngestError("Give the project a name.")
    with session_scope() as s:
        if q.get_project_by_name(s, name) is not None:
            raise IngestError(f"A project named “{name}” already exists; choose another name.")
    return name


def _store(ds: Dataset, items: list[dict], name: str, source: str, description: str, author: str
           ) -> tuple[int, int]:
    with session_scope() as s:
        try:
            project = q.create_project(s, name, source, root_path=ds.root, description=description)
        except ValueError as exc:  # created by someone else in the meantime
            raise IngestError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
        n = q.add_images(s, project.id, items, author=author)
        return project.id, n


# --- from a folder on the server --------------------------------------------------------


def import_roots() -> list[str]:
    """Folders below which the server imports (``OSAD_IMPORT_ROOTS``, separated by
    ``os.pathsep``); by default only the data directory."""
    env = [r for r in os.environ.get("OSAD_IMPORT_ROOTS", "").split(os.pathsep) if r.strip()]
    return env or [str(data_dir())]


def skipped_note(skipped: Sequence[tuple[str, str]] | Sequence[str]) -> str:
    whys = [w if isinstance(w, str) else w[1] for w in skipped]
    more = f" and {len(whys) - 3} more" if len(whys) > 3 else ""
    return f"skipped {len(whys)} file(s): " + "; ".join(whys[:3]) + more


def _readable(ds: Dataset, skipped: list) -> tuple[Dataset, list[dict]]:
    """The dataset's images that pass the guarded reader (decoded once each, which also
    makes their grid thumbnails), with their rows."""
    from osad_core.store import image_items  # imports scikit-learn: only when a project is made

    items = image_items(ds.records, ds.root, skipped=skipped, decode=True, thumbs_dir=data_dir() / "thumbs")
    ok = {it["path"] for it in items}
    return replace(ds, records=[r for r in ds.records if r.path in ok]), items


def create_from_folder(path: str, name: str = "", author: str = "import") -> Created:
    """A project from a server folder below the import roots: MVTec layout keeps its
    labels, a flat folder becomes all unlabelled. Files that are not readable images are
    skipped and listed in the notes. Raises ``DataError``/``IngestError``; creates nothing then."""
    t0 = time.perf_counter()
    path = (path or "").strip()
    if not path:
        raise IngestError("Enter the path of a folder on the server.")
    folder, root = confined_folder(path, import_roots())
    if more_images_than(folder, IN_PAGE_MAX):  # names only: even listing 100,000 files takes seconds
        return _import_in_background(folder, _check_name_free(name or folder.name), str(root), author, t0)
    ds = load_folder(folder, confine_to=root)
    name = _check_name_free(name or ds.name)
    skipped = list(ds.skipped)
    ds, items = _readable(ds, skipped)
    if not items:
        raise IngestError(f"None of the images in `{path}` is readable ({skipped[0][1]}); nothing was created.")
    summary = describe_dataset(ds)
    pid, n = _store(ds, items, name, "folder", f"from {ds.root}: {summary}", author)
    return Created(pid, name, n, time.perf_counter() - t0, [summary] + ([skipped_note(skipped)] if skipped else []))


def _import_in_background(folder: Path, name: str, root: str, author: str, t0: float) -> Created:
    """Create the project now and queue an ``import`` job that lists the folder and
    stores its images in batches (:mod:`osad_core.folder_import`); the project's card
    shows the job's progress, and the job writes what it found into the description."""
    with session_scope() as s:
        try:
            project = q.create_project(s, name, "folder", root_path=str(folder),
                                       description=f"from {folder}: importing in the background")
        except ValueError as exc:
            raise IngestError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
        job = q.enqueue_job(s, "import", import_payload(project.id, str(folder), root, author), created_by=author)
        pid, job_id = project.id, job.id
    return Created(pid, name, 0, time.perf_counter() - t0,
                   [f"more than {IN_PAGE_MAX:,} images: importing them in the background"], job_id=job_id)


def import_payload(project_id: int, folder: str, confine_to: str | None, author: str) -> dict:
    return {"project_id": int(project_id), "folder": str(folder), "confine_to": confine_to, "author": author}


def resume_import(project_id: int, author: str) -> int:
    """Queue the import of a project whose import job was cancelled or failed; files it
    already stored are skipped unread. Returns the new job's id."""
    with session_scope() as s:
        last = q.last_import_job(s, project_id)
        if last is None:
            raise IngestError("This project was not imported from a folder in the background; nothing to resume.")
        if last.status in ("queued", "running"):
            return last.id
        job = q.enqueue_job(s, "import", dict(last.payload_json), created_by=author)
        return job.id


def queue_folder_scoring(run, path: str, author: str) -> int:
    """Queue a ``score`` job: every image of a server folder (below the import roots)
    scored with the run's model, rows to a CSV in the data folder; returns the job id."""
    path = (path or "").strip()
    if not path:
        raise IngestError("Enter the path of a folder on the server.")
    if not run.model_path or not Path(run.model_path).is_file():
        raise IngestError(f"Run {run.id} has no saved model to score with.")
    folder, root = confined_folder(path, import_roots())
    n = len(load_folder(folder, confine_to=root).records)  # names only: refuses an empty folder now
    with session_scope() as s:
        job = q.enqueue_job(s, "score", {"run_id": run.id, "model_path": run.model_path, "folder": str(folder),
                                         "confine_to": str(root), "threshold": run.threshold, "images": n},
                            created_by=author)
        return job.id


# --- from uploaded files ----------------------------------------------------------------


def _safe_part(part: str) -> str:
    part = re.sub(r"[^\w.\- ]+", "_", part).strip(" .")
    return part or "image"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "project"


def save_upload(files: Sequence[tuple[str, bytes]], folder: Path, nothing: str = "nothing was created"
                ) -> tuple[list[str], list[str]]:
    """Write the images of an upload (image files and zips of them) below ``folder``.

    Returns (paths written, notes on what was skipped). Zips are streamed member by member
    under the guarded reader's limits; inside a zip, hidden and system files are ignored,
    other non-image files, unsafe names and links are skipped with a note (archives often
    carry a licence next to the images). A file uploaded directly that is not an image
    nor a zip is an error, raised before anything is written. Files are not decoded here.
    """
    not_images = [PurePosixPath(f.replace("\\", "/")).name for f, _ in files
                  if not is_image_name(f) and not f.lower().endswith(".zip")]
    if not_images:
        verb = "is not an image" if len(not_images) == 1 else "are not images"
        raise IngestError(
            f"{_quote_list(not_images)} {verb} (accepted: {ACCEPTED} … or a .zip of them); {nothing}.")
    used: set[str] = set()
    notes: list[str] = []
    written: list[str] = []

    def unique(rel: str) -> Path:
        base, n = rel, 2
        while rel.lower() in used:
            p = PurePosixPath(base)
            rel = str(p.with_name(f"{p.stem}_{n}{p.suffix}"))
            n += 1
        used.add(rel.lower())
        return folder / rel

    def member_dest(member: str) -> Path | None:
        parts = [p for p in PurePosixPath(member.replace("\\", "/")).parts if p not in ("", "/", ".")]
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            return None
        if not is_image_name(member):
            notes.append(f"`{member}` (not an image)")
            return None
        return unique("/".join(_safe_part(p) for p in parts))

    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in files:
        fname = PurePosixPath(fname.replace("\\", "/")).name
        if fname.lower().endswith(".zip"):
            try:
                paths, skipped = extract_zip(io.BytesIO(data), fname, member_dest)
            except DataError as exc:
                raise IngestError(f"{_sentence(str(exc))}; {nothing}.") from None
            written += paths
            notes += skipped
        else:
            dest = unique(_safe_part(fname))
            dest.write_bytes(data)
            written.append(str(dest))
    return written, notes


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _dataset_root(folder: Path) -> Path:
    """Descend through a zip's single top-level folder (``parts.zip`` -> ``parts/``)."""
    while True:
        children = [c for c in folder.iterdir() if not c.name.startswith(".")]
        if len(children) == 1 and children[0].is_dir() and children[0].name not in ("train", "test"):
            folder = children[0]
        else:
            return folder


def create_from_uploads(files: Sequence[tuple[str, bytes]], name: str, author: str = "import") -> Created:
    """A project from uploaded image files and/or zips (stored under
    ``<data dir>/uploads/<slug>-<id>/``, the one folder the project owns). A zip in MVTec
    layout keeps its labels; files that are not readable images are skipped, removed and
    listed in the notes."""
    t0 = time.perf_counter()
    if not files:
        raise IngestError("Choose image files or a zip to upload.")
    name = _check_name_free(name)
    folder = uploads_dir() / f"{_slug(name)}-{uuid.uuid4().hex[:8]}"
    try:
        written, notes = save_upload(files, folder)
        if not written:
            raise IngestError(f"The upload holds no images (accepted: {ACCEPTED} … or a .zip of them); "
                              "nothing was created.")
        skipped: list[tuple[str, str]] = []
        ds, items = _readable(load_folder(_dataset_root(folder), name), skipped)
        for path, _ in skipped:  # a refused file is not kept
            Path(path).unlink(missing_ok=True)
        notes = [why for _, why in skipped] + notes
        if not items:
            raise IngestError(f"The upload holds no readable images ({notes[0]}); nothing was created.")
        summary = describe_dataset(ds)
        pid, n = _store(ds, items, name, "upload", f"uploaded: {summary}", author)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Created(pid, name, n, time.perf_counter() - t0, [summary] + ([skipped_note(notes)] if notes else []))


@contextmanager
def scoring_folder(max_age_s: float = 3600.0) -> Iterator[Path]:
    """A fresh folder for images uploaded to be scored, removed when scoring is done.

    Scored uploads are not part of any project, so nothing keeps them; folders left by a
    process that died mid-scoring are swept once they are ``max_age_s`` old.
    """
    base = uploads_dir() / "scoring"
    if base.is_dir():
        for old in base.iterdir():
            try:
                if time.time() - old.stat().st_mtime > max_age_s:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
    folder = base / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- scored images that join a project ------------------------------------------------------


def inspected_dir(project_id: int) -> Path:
    """The folder a project owns for images scored on Inspect (removed with the project)."""
    return uploads_dir() / f"inspect-{int(project_id)}"


def keep_scored(path: str, project_id: int) -> tuple[str, str]:
    """Copy a scored upload into the project's folder before its scoring folder is removed.

    The file goes through the guarded reader first and is named by its content hash, so
    scoring the same image again keeps one copy. Returns (kept path, SHA-1).
    """
    read_image(path)  # refuses whatever the guarded reader refuses, before anything is kept
    digest = file_sha1(path)
    dest = inspected_dir(project_id) / f"{digest}{Path(path).suffix.lower()}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # atomic: a half-copied file never carries the final name
    return str(dest), digest


def sweep_inspected(project_id: int, max_age_s: float = 86400.0) -> int:
    """Remove kept copies that never joined the project once they are ``max_age_s`` old."""
    folder = inspected_dir(project_id)
    if not folder.is_dir():
        return 0
    files = list(folder.iterdir())
    with session_scope() as s:  # only these files' rows, not the whole project's
        used = q.known_paths(s, project_id, [str(f) for f in files])
    n = 0
    for f in files:
        try:
            if str(f) not in used and time.time() - f.stat().st_mtime > max_age_s:
                f.unlink()
                n += 1
        except OSError:
            pass
    return n


def add_scored(project_id: int, path: str, digest: str, name: str, label: str, defect_type: str | None,
               author: str) -> str:
    """Add a kept scored image to the project with a label, unless the same content is
    already there; returns the sentence to show."""
    from osad_core.safeio import probe

    if label == "anomaly" and not (defect_type or "").strip():
        raise IngestError("Type a defect type for the anomaly (e.g. “crack”).")
    kept = Path(path).resolve()
    if inspected_dir(project_id).resolve() not in kept.parents or not kept.is_file():
        raise IngestError("That scored image is no longer kept; score it again.")
    info = probe(kept)
    with session_scope() as s:
        same = q.image_by_hash(s, project_id, digest)
        if same is not None:
            return f"`{same.rel_path}` already holds this image (labelled {same.label}); nothing was added."
        q.add_images(s, project_id, [{
            "path": str(kept), "rel_path": f"inspect/{_safe_part(name)}", "content_hash": digest,
            "width": info.width, "height": info.height, "label": label,
            "defect_type": defect_type.strip() if label == "anomaly" and defect_type else None, "split": "train",
        }], author=author)
    what = f"anomaly ({defect_type.strip()})" if label == "anomaly" else label
    return f"Added `{name}` to the project as {what}, for training."


# --- the ELPV demo ------------------------------------------------------------------------


def create_elpv_demo(author: str = "import") -> Created:
    """The built-in demo: 2,624 ELPV solar-cell images from the ``elpv-dataset`` package.

    Labels as the DRA/AHL papers use them: defect probability 0 = normal (75 % for
    training, 25 % held out, ``random_state=42``), probability 1 = anomaly of type
    ``mono`` or ``poly``; the 401 cells rated 1/3 or 2/3 stay unlabelled for the
    inspector to judge.
    """
    t0 = time.perf_counter()
    name = _check_name_free(ELPV_DEMO_NAME)
    ds = import_elpv(include_uncertain=True)
    summary = describe_dataset(ds)
    desc = ("Electroluminescence images of solar cells (elpv-dataset). Normal = defect probability 0, "
            "anomalies = probability 1 by cell type (mono/poly); uncertain cells left unlabelled.")
    from osad_core.store import image_items

    pid, n = _store(ds, image_items(ds.records, ds.root), name, "elpv", desc, author)
    return Created(pid, name, n, time.perf_counter() - t0, [summary])


# --- deleting -----------------------------------------------------------------------------


def owned_folder(source: str, root_path: str | None) -> Path | None:
    """The one folder a project owns: ``uploads/<slug>-<id>/``, made when it was created
    from an upload (its root lies in it). A project made from a server folder owns no
    files, even when that folder lies in the data dir or in another project's uploads."""
    if source != "upload" or not root_path:
        return None
    up = uploads_dir().resolve()
    r = Path(root_path).resolve()
    if up not in r.parents:
        return None
    return up / r.relative_to(up).parts[0]


def delete_project(project_id: int) -> str:
    """Delete a project with its labels, runs and jobs; also remove the files the app
    made for it (its upload folder, model checkpoints under the data dir, the CSVs of its
    folder-scoring jobs). Its import and scoring jobs still queued or running are
    cancelled first. Images that it imported from elsewhere are never touched. Returns
    the project's name."""
    from osad_core.bulk_score import scores_csv

    with session_scope() as s:
        project = q.get_project(s, project_id)
        if project is None:
            raise IngestError("That project no longer exists.")
        name, owned = project.name, owned_folder(project.source, project.root_path)
        runs = q.list_runs(s, project_id)
        models = [r.run.model_path for r in runs if r.run.model_path]
        jobs = (q.payload_jobs(s, "score", "run_id", [r.run.id for r in runs])
                + q.payload_jobs(s, "import", "project_id", [project_id]))
        for job in jobs:
            if job.status in ("queued", "running"):
                q.request_cancel(s, job.id)
        score_files = [scores_csv(data_dir(), job.id) for job in jobs if job.kind == "score"]
        q.delete_project(s, project_id)
    for f in score_files:
        f.unlink(missing_ok=True)
    base = data_dir().resolve()
    for m in models:
        p = Path(m).resolve()
        if base in p.parents:
            p.unlink(missing_ok=True)
    if owned is not None:
        shutil.rmtree(owned, ignore_errors=True)
    shutil.rmtree(inspected_dir(project_id), ignore_errors=True)
    shutil.rmtree(data_dir() / "masks" / str(int(project_id)), ignore_errors=True)  # masks drawn in the app
    return name


__all__ = [
    "ELPV_DEMO_NAME",
    "UPLOAD_TYPES",
    "Created",
    "DataError",
    "IngestError",
    "create_elpv_demo",
    "create_from_folder",
    "create_from_uploads",
    "save_upload",
    "scoring_folder",
    "keep_scored",
    "add_scored",
    "sweep_inspected",
    "inspected_dir",
    "import_roots",
    "import_payload",
    "resume_import",
    "queue_folder_scoring",
    "IN_PAGE_MAX",
    "delete_project",
    "describe_dataset",
]

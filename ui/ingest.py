"""Creating and deleting projects: a server folder, uploaded images or a zip, the ELPV demo.

Every creator checks its input completely before it writes anything, and writes the
project and its images in one database transaction, so bad input (a non-image upload,
an empty folder, a path that does not exist) leaves no half-created project behind.
Errors are :class:`IngestError` (or the library's ``DataError``) with a one-sentence
message meant for the user as it is.
"""
from __future__ import annotations

import io
import logging
import re
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from db import data_dir, session_scope
from db import queries as q
from osad_core.data import IMAGE_EXTENSIONS, DataError, Dataset, import_elpv, load_folder

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


def uploads_dir() -> Path:
    return data_dir() / "uploads"


def _quote_list(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(f"`{x}`" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def describe_dataset(ds: Dataset) -> str:
    """One line saying what was recognised in a folder."""
    labelled = [r for r in ds.records if r.label >= 0]
    if not labelled:
        return f"{len(ds.records)} unlabelled images (flat folder)"
    tr = len(ds.select(split="train", label=0))
    te = len(ds.select(split="test", label=0))
    an = len(ds.select(label=1))
    types = ", ".join(ds.defect_types) or "none"
    unl = len(ds.records) - len(labelled)
    extra = f", {unl} unlabelled" if unl else ""
    return f"MVTec layout: {tr} normal for training, {te} normal held out, {an} anomalies ({types}){extra}"


def _check_name_free(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise IngestError("Give the project a name.")
    with session_scope() as s:
        if q.get_project_by_name(s, name) is not None:
            raise IngestError(f"A project named “{name}” already exists; choose another name.")
    return name


def _store(ds: Dataset, name: str, source: str, description: str, author: str) -> tuple[int, int]:
    from osad_core.store import image_items  # imports scikit-learn: only when a project is made

    items = image_items(ds.records, ds.root)
    with session_scope() as s:
        try:
            project = q.create_project(s, name, source, root_path=ds.root, description=description)
        except ValueError as exc:  # created by someone else in the meantime
            raise IngestError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
        n = q.add_images(s, project.id, items, author=author)
        return project.id, n


# --- from a folder on the server --------------------------------------------------------


def create_from_folder(path: str, name: str = "", author: str = "import") -> Created:
    """A project from a server folder: MVTec layout keeps its labels, a flat folder
    becomes all unlabelled. Raises ``DataError``/``IngestError``; creates nothing then."""
    t0 = time.perf_counter()
    path = (path or "").strip()
    if not path:
        raise IngestError("Enter the path of a folder on the server.")
    ds = load_folder(path)
    name = _check_name_free(name or ds.name)
    summary = describe_dataset(ds)
    pid, n = _store(ds, name, "folder", f"from {ds.root}: {summary}", author)
    return Created(pid, name, n, time.perf_counter() - t0, [summary])


# --- from uploaded files ----------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _safe_part(part: str) -> str:
    part = re.sub(r"[^\w.\- ]+", "_", part).strip(" .")
    return part or "image"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "project"


def collect_upload(files: Sequence[tuple[str, bytes]], nothing: str = "nothing was created"
                   ) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(relative path, bytes) of every image in the upload, and the zip members skipped.

    A file that is not an image (nor a zip) is an error; inside a zip, hidden and
    system files are ignored and other non-image files are skipped with a note, since
    archives often carry a licence or a readme next to the images.
    """
    entries: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    not_images: list[str] = []
    used: set[str] = set()

    def unique(rel: str) -> str:
        base, n = rel, 2
        while rel.lower() in used:
            p = PurePosixPath(base)
            rel = str(p.with_name(f"{p.stem}_{n}{p.suffix}"))
            n += 1
        used.add(rel.lower())
        return rel

    for fname, data in files:
        fname = PurePosixPath(fname.replace("\\", "/")).name
        if fname.lower().endswith(".zip"):
            try:
                zf = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                raise IngestError(f"`{fname}` is not a readable zip file; {nothing}.") from None
            with zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                        continue
                    if not _is_image_name(info.filename):
                        skipped.append(info.filename)
                        continue
                    rel = "/".join(_safe_part(p) for p in parts if p not in ("", "/", ".."))
                    entries.append((unique(rel), zf.read(info)))
        elif _is_image_name(fname):
            entries.append((unique(_safe_part(fname)), data))
        else:
            not_images.append(fname)
    if not_images:
        verb = "is not an image" if len(not_images) == 1 else "are not images"
        raise IngestError(
            f"{_quote_list(not_images)} {verb} (accepted: {ACCEPTED} … or a .zip of them); {nothing}."
        )
    if not entries:
        raise IngestError(f"The upload holds no images (accepted: {ACCEPTED} … or a .zip of them); {nothing}.")
    broken = [rel for rel, data in entries if not _decodes(data)]
    if broken:
        verb = "is not a readable image" if len(broken) == 1 else "are not readable images"
        raise IngestError(f"{_quote_list(broken)} {verb}; {nothing}.")
    return entries, skipped


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
    ``<data dir>/uploads/``). A zip in MVTec layout keeps its labels."""
    t0 = time.perf_counter()
    if not files:
        raise IngestError("Choose image files or a zip to upload.")
    name = _check_name_free(name)
    entries, skipped = collect_upload(files)
    folder = uploads_dir() / f"{_slug(name)}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, data in entries:
            dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        ds = load_folder(_dataset_root(folder), name)
        summary = describe_dataset(ds)
        pid, n = _store(ds, name, "upload", f"uploaded: {summary}", author)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    notes = [summary]
    if skipped:
        notes.append(f"skipped {len(skipped)} file(s) in the zip that are not images: {_quote_list(skipped)}")
    return Created(pid, name, n, time.perf_counter() - t0, notes)


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
    pid, n = _store(ds, name, "elpv", desc, author)
    return Created(pid, name, n, time.perf_counter() - t0, [summary])


# --- deleting -----------------------------------------------------------------------------


def delete_project(project_id: int) -> str:
    """Delete a project with its labels, runs and jobs; also remove the files the app
    made for it (uploaded images, model checkpoints under the data dir). Images that
    live elsewhere on the server are never touched. Returns the project's name."""
    with session_scope() as s:
        project = q.get_project(s, project_id)
        if project is None:
            raise IngestError("That project no longer exists.")
        name, root = project.name, project.root_path
        models = [r.run.model_path for r in q.list_runs(s, project_id) if r.run.model_path]
        q.delete_project(s, project_id)
    base = data_dir().resolve()
    for m in models:
        p = Path(m).resolve()
        if base in p.parents:
            p.unlink(missing_ok=True)
    if root:
        up = uploads_dir().resolve()
        r = Path(root).resolve()
        if up in r.parents:
            top = up / r.relative_to(up).parts[0]
            shutil.rmtree(top, ignore_errors=True)
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
    "collect_upload",
    "delete_project",
    "describe_dataset",
]

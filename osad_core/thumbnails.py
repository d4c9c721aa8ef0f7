"""Grid thumbnails on disk: ``<data dir>/thumbs/<key[:2]>/<key>_<size>.jpg``.

Keyed by the image's content hash (the path's hash when the file had none), so a
thumbnail survives renames and is shared by every project holding the same file. The
import (:func:`osad_core.store.image_items` with ``thumbs_dir``) makes them from the
decode it does anyway to check each file, so the Label grid of an imported project only
reads files; a file without one (an older project, a project made by the command line)
gets it when a page first shows it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

from .errors import DataError
from .safeio import read_image

THUMB_SIZE = 192


def thumb_key(path: str, content_hash: str | None) -> str:
    return content_hash or hashlib.sha1(str(path).encode()).hexdigest()


def thumb_file(folder: str | Path, path: str, content_hash: str | None, size: int = THUMB_SIZE) -> Path:
    key = thumb_key(path, content_hash)
    return Path(folder) / key[:2] / f"{key}_{size}.jpg"


def save_thumbnail(im: Image.Image, out: Path, size: int = THUMB_SIZE) -> Path:
    """Shrink ``im`` (a copy) to fit ``size`` and write it as JPEG at ``out``, atomically."""
    im = im.copy()
    im.thumbnail((size, size), Image.BILINEAR)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a temp name of its own per writer, then an atomic rename: an import job and page
    # sessions (threads of one process included) making the same thumbnail never clash
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
        try:
            im.save(f, "JPEG", quality=85)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, out)
    return out


def make_thumbnail(folder: str | Path, path: str, content_hash: str | None = None, size: int = THUMB_SIZE,
                   image: Image.Image | None = None) -> Path | None:
    """The thumbnail's file, made now if missing (from ``image`` when the caller has
    decoded the file already); None if the guarded reader refuses the file."""
    out = thumb_file(folder, path, content_hash, size)
    if out.is_file():
        return out
    if image is None:
        try:
            image = read_image(path, reduce_to=size)  # a JPEG is decoded at about the size needed
        except DataError:
            return None
    return save_thumbnail(image, out, size)


__all__ = ["THUMB_SIZE", "make_thumbnail", "save_thumbnail", "thumb_file", "thumb_key"]

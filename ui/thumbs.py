"""Thumbnails made once and cached on disk under ``<data dir>/thumbs/``.

Keyed by the image's content hash (the path's hash when the file had none), so a
thumbnail survives renames and is shared by every project holding the same file. The
label grid asks only for the thumbnails of the page it shows.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from db import data_dir
from osad_core.errors import DataError
from osad_core.safeio import read_image

THUMB_SIZE = 192
VIEW_SIZE = 512


def _key(path: str, content_hash: str | None) -> str:
    return content_hash or hashlib.sha1(str(path).encode()).hexdigest()


def thumb_path(path: str, content_hash: str | None, size: int = THUMB_SIZE) -> Path:
    key = _key(path, content_hash)
    return data_dir() / "thumbs" / key[:2] / f"{key}_{size}.jpg"


def thumbnail(path: str, content_hash: str | None = None, size: int = THUMB_SIZE) -> Path | None:
    """Path of the cached JPEG thumbnail (made now if missing); None if the file is
    unreadable or refused by the guarded reader (the grid shows a placeholder then)."""
    out = thumb_path(path, content_hash, size)
    if out.is_file():
        return out
    try:
        im = read_image(path, reduce_to=size)  # a JPEG is decoded at about the size needed
    except DataError:
        return None
    im.thumbnail((size, size), Image.BILINEAR)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a temp name of its own per writer, then an atomic rename: sessions (threads of one
    # process included) making the same thumbnail at once never clash
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


def view_image(path: str, max_side: int = VIEW_SIZE) -> np.ndarray:
    """The image as an RGB uint8 array, no larger than ``max_side`` (for the large view).
    Raises ``DataError`` with one sentence for a file the guarded reader refuses."""
    im = read_image(path, reduce_to=max_side)
    im.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

"""Thumbnails made once and cached on disk under ``<data dir>/thumbs/``.

Keyed by the image's content hash (the path's hash when the file had none), so a
thumbnail survives renames and is shared by every project holding the same file. The
label grid asks only for the thumbnails of the page it shows.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from db import data_dir
from osad_core.data import DataError, read_image

THUMB_SIZE = 192
VIEW_SIZE = 512


def _key(path: str, content_hash: str | None) -> str:
    return content_hash or hashlib.sha1(str(path).encode()).hexdigest()


def thumb_path(path: str, content_hash: str | None, size: int = THUMB_SIZE) -> Path:
    key = _key(path, content_hash)
    return data_dir() / "thumbs" / key[:2] / f"{key}_{size}.jpg"


def _open_small(path: str, size: int) -> Image.Image:
    """Decode at (about) the size needed: JPEG's draft mode skips most of the work."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"`{path}` does not exist") from None
    except Exception:  # let read_image give the one-sentence reason
        pass
    return read_image(path)


def thumbnail(path: str, content_hash: str | None = None, size: int = THUMB_SIZE) -> Path | None:
    """Path of the cached JPEG thumbnail (made now if missing); None if unreadable."""
    out = thumb_path(path, content_hash, size)
    if out.is_file():
        return out
    try:
        im = _open_small(path, size)
    except DataError:
        return None
    im.thumbnail((size, size), Image.BILINEAR)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    im.save(tmp, "JPEG", quality=85)
    os.replace(tmp, out)  # atomic: two sessions making the same thumbnail never clash
    return out


def view_image(path: str, max_side: int = VIEW_SIZE) -> np.ndarray:
    """The image as an RGB uint8 array, no larger than ``max_side`` (for the large view)."""
    im = _open_small(path, max_side)
    im.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

"""Thumbnails and views of images for the pages.

Thumbnails live on disk under ``<data dir>/thumbs/`` (:mod:`osad_core.thumbnails`): the
import makes them, and a page makes any still missing once, for the images it shows.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from db import data_dir
from osad_core.safeio import read_image
from osad_core.thumbnails import THUMB_SIZE, make_thumbnail, thumb_file

VIEW_SIZE = 512


def thumbs_dir() -> Path:
    return data_dir() / "thumbs"


def thumb_path(path: str, content_hash: str | None, size: int = THUMB_SIZE) -> Path:
    return thumb_file(thumbs_dir(), path, content_hash, size)


def thumbnail(path: str, content_hash: str | None = None, size: int = THUMB_SIZE) -> Path | None:
    """Path of the cached JPEG thumbnail (made now if missing); None if the file is
    unreadable or refused by the guarded reader (the grid shows a placeholder then)."""
    return make_thumbnail(thumbs_dir(), path, content_hash, size)


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

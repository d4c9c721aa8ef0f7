"""Defect masks drawn in the app: files, canvas strokes to a mask, and the red overlay.

A mask is a grayscale PNG at the image's full resolution (255 = defect; drawn on the
smaller large view, strokes are scaled up), written once under
``<data dir>/masks/<project id>/`` and never overwritten: every save is a new file and a
``mask_events`` row (:mod:`db.masks`), so undo can go back to any earlier mask, the
imported ``ground_truth`` one included. Training reads ``images.mask_path`` as before.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from db import data_dir
from osad_core.safeio import open_image

PAINT = (230, 57, 70)  # stroke colours on the canvas: red adds to the mask, blue erases
ERASE = (30, 136, 229)


def masks_dir(project_id: int) -> Path:
    return data_dir() / "masks" / str(int(project_id))


def load(path: str | None, size: tuple[int, int]) -> np.ndarray:
    """The mask at ``path`` as a bool array of ``size`` = (height, width); empty if none.

    Through the guarded reader: imported masks come from outside."""
    h, w = size
    if not path:
        return np.zeros((h, w), bool)
    with open_image(path) as im:
        m = im.convert("L").resize((w, h), Image.NEAREST)
    return np.asarray(m) > 127


def resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` = (height, width), nearest neighbour."""
    if mask.shape == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 127


def save(project_id: int, image_id: int, mask: np.ndarray) -> str:
    """Write a new mask file (atomically) and return its path."""
    folder = masks_dir(project_id)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{int(image_id)}-{uuid.uuid4().hex[:12]}.png"
    tmp = dest.with_name(f".{dest.name}.tmp")
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(tmp, format="PNG")
    os.replace(tmp, dest)
    return str(dest)


def apply_strokes(mask: np.ndarray, rgba: np.ndarray | None) -> np.ndarray:
    """The mask after the canvas strokes: red strokes add, blue strokes erase.

    ``rgba`` is the canvas (H', W', 4) at display size; it is scaled to the mask's size
    (nearest, so a stroke stays a stroke)."""
    if rgba is None or not np.asarray(rgba).size:
        return mask.copy()
    rgba = np.asarray(rgba)
    h, w = mask.shape
    canvas = np.asarray(Image.fromarray(rgba.astype(np.uint8), "RGBA").resize((w, h), Image.NEAREST)).astype(int)
    drawn = canvas[..., 3] > 0
    red, blue = canvas[..., 0], canvas[..., 2]
    return (mask | (drawn & (red > blue))) & ~(drawn & (blue > red))


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with its mask tinted red, as the canvas background."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(PAINT, np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


__all__ = ["PAINT", "ERASE", "masks_dir", "load", "resize", "save", "apply_strokes", "overlay"]

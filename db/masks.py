"""SQL for defect masks: the current mask of an image and its append-only history.

``images.mask_path`` is what training reads (``ImageRecord.mask_path``); every change
to it is one :class:`~db.models.MaskEvent`, so a drawing can be undone back to the
mask that was imported with the image. The PNG files themselves are written by the
app (``ui/masks.py``); this module only reads and writes rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Image, MaskEvent, utcnow


def _image(s: Session, image_id: int) -> Image:
    im = s.get(Image, int(image_id))
    if im is None:
        raise ValueError(f"image {image_id} does not exist")
    return im


def set_mask(s: Session, image_id: int, path: str | None, author: str = "user",
             reverts_id: int | None = None) -> MaskEvent:
    """Make ``path`` (or no mask) the image's current mask; returns the event."""
    im = _image(s, image_id)
    ev = MaskEvent(project_id=im.project_id, image_id=im.id, path=path, previous_path=im.mask_path,
                   author=author, reverts_id=reverts_id, created_at=utcnow())
    im.mask_path = path
    im.updated_at = ev.created_at
    s.add(ev)
    s.flush()
    return ev


def undo_mask(s: Session, image_id: int, author: str = "user") -> MaskEvent | None:
    """Undo the latest mask change of the image that is not undone yet (walking back
    through earlier ones on repeated calls); None when there is nothing to undo."""
    events = list(s.scalars(select(MaskEvent).where(MaskEvent.image_id == int(image_id))
                            .order_by(MaskEvent.id.desc())))
    undone = {e.reverts_id for e in events if e.reverts_id is not None}
    for ev in events:
        if ev.reverts_id is None and ev.id not in undone:
            return set_mask(s, image_id, ev.previous_path, author, reverts_id=ev.id)
    return None


def redo_mask(s: Session, image_id: int, author: str = "user") -> MaskEvent | None:
    """Re-apply the change the latest undo took back, if the mask was not changed since."""
    latest = s.scalars(select(MaskEvent).where(MaskEvent.image_id == int(image_id))
                       .order_by(MaskEvent.id.desc()).limit(1)).first()
    if latest is None or latest.reverts_id is None:
        return None
    original = s.get(MaskEvent, latest.reverts_id)
    return set_mask(s, image_id, original.path, author) if original is not None else None


def mask_history(s: Session, image_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The image's mask changes, newest first."""
    rows = s.scalars(select(MaskEvent).where(MaskEvent.image_id == int(image_id))
                     .order_by(MaskEvent.id.desc()).limit(limit))
    return [{"id": e.id, "path": e.path, "previous_path": e.previous_path, "author": e.author,
             "reverts_id": e.reverts_id, "created_at": e.created_at} for e in rows]


__all__ = ["set_mask", "undo_mask", "redo_mask", "mask_history"]

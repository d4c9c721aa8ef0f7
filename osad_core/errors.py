"""Errors whose message is meant for the user as it is (one sentence, no traceback)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message is meant for the user as it is."""


class ImageRefused(DataError):
    """A file that the guarded image reader will not decode (see :mod:`osad_core.safeio`)."""

"""Detectors behind one interface; see :mod:`osad_core.methods.base`."""
from .base import Detector, Prediction, available_methods, load_detector, make_detector  # noqa: F401

"""One detector interface and a registry of methods by name.

    detector = make_detector("dra", preset="quick", overrides={"epochs": 5})
    detector.fit(train_normal, train_anomalies, callbacks)
    pred = detector.predict(records)       # .scores (N,), .maps (N,h,w), .embeddings (N,D)
    detector.save(path); load_detector(path)
"""
from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..data import IMAGE_CACHE, ImageRecord
from ..names import PRESETS  # noqa: F401 (defined torch-free for the command line)
from ..train import Callbacks

log = logging.getLogger(__name__)



@dataclass
class Prediction:
    scores: np.ndarray  # (N,) larger = more anomalous
    maps: np.ndarray  # (N, h, w) float32, raw values (not normalised)
    embeddings: np.ndarray  # (N, D) float32
    embedding_kind: str = ""
    records: list[ImageRecord] = field(default_factory=list)  # the readable inputs, in order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable inputs (path, reason)
    extra: dict = field(default_factory=dict)  # e.g. per-head scores


class Detector(ABC):
    """Base class: subclasses set ``name``, ``description``, ``defaults`` and ``presets``."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line: what it is good at
    defaults: ClassVar[dict]
    presets: ClassVar[dict[str, dict]]  # preset -> overrides of defaults
    preset_notes: ClassVar[dict[str, str]] = {}
    choices: ClassVar[dict[str, tuple]] = {}  # setting -> allowed values, checked on creation

    def __init__(self, preset: str = "quick", overrides: dict | None = None):
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for {self.name}; choose one of {', '.join(self.presets)}")
        cfg = copy.deepcopy(self.defaults)
        cfg.update(self.presets[preset])
        for k, v in (overrides or {}).items():
            if v is None:
                continue
            if k not in cfg:
                raise ValueError(f"unknown setting {k!r} for {self.name}; known: {', '.join(sorted(cfg))}")
            cfg[k] = v
        for key, allowed in self.choices.items():
            if cfg[key] not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, got {cfg[key]!r}")
        self.preset = preset
        self.config = cfg
        self.backbone_info: dict | None = None
        self.history: list[dict] = []
        self.device_name: str = "cpu"
        self.fitted = False

    # -- the interface ------------------------------------------------------------------
    @abstractmethod
    def fit(self, train_normal: list[ImageRecord], train_anomalies: list[ImageRecord],
            callbacks: Callbacks | None = None) -> "Detector":
        ...

    @abstractmethod
    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> Prediction:
        """Score uint8 images (N, S, S, 3) already resized to ``config['image_size']``."""

    def predict(self, records: list[ImageRecord] | list[str], batch_size: int = 32,
                callbacks: Callbacks | None = None, cache: bool = True) -> Prediction:
        """Score image records or paths; unreadable files are reported in ``skipped``.
        ``cache=False``: decoded images are not kept (images scored once, in bulk)."""
        recs = [r if isinstance(r, ImageRecord) else ImageRecord(str(r), -1) for r in records]
        size = self.config["image_size"]
        ok, skipped, parts = [], [], []
        chunk = 128  # decode in chunks: thousands of images never sit in memory twice; progress per chunk
        for i in range(0, len(recs), chunk):
            if callbacks:
                callbacks.check_cancel()
            arr, good, bad = IMAGE_CACHE.load_many(recs[i:i + chunk], size, keep=cache)
            ok += good
            skipped += bad
            if len(good):
                parts.append(self.predict_arrays(arr, batch_size))
            if callbacks:
                callbacks.add(len(recs[i:i + chunk]))
        pred = _concat(parts, self)
        pred.records, pred.skipped = ok, skipped
        return pred

    def training_stages(self) -> list[tuple[str, float]]:
        """The stages of :meth:`fit`, each with its expected share of the training time
        (for the progress bar only); a job adds its own stages after these."""
        return [("Training", 1.0)]

    def progress_callbacks(self, callbacks: Callbacks | None) -> Callbacks:
        """``callbacks`` (or silent ones) with this detector's stages planned, unless the
        caller (a job) planned its stages already."""
        cb = callbacks or Callbacks()
        cb.plan(self.training_stages())
        return cb

    def head_scores(self, pred: Prediction) -> dict[str, np.ndarray]:
        """Each head's own score of ``pred``'s images, oriented so that larger = more
        anomalous (reported as ``head_<name>_image_auroc``); {} for single-head methods."""
        return {}

    def training_metrics(self) -> dict[str, float]:
        """Numbers about the training run itself (e.g. SaliencyCut's salient fraction),
        stored with the test metrics; each needs an entry in ``evaluate.METRIC_DETAILS``."""
        return {}

    def state(self) -> dict:
        """Everything beyond config needed to rebuild the fitted model (tensors allowed)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def save(self, path: str | Path) -> Path:
        """Write the fitted model as one ``.osad`` file (safetensors + JSON manifest), atomically."""
        from ..modelfile import to_bytes, write_atomic

        if not self.fitted:
            raise RuntimeError("fit the detector before saving it")
        return write_atomic(path, to_bytes({
            "method": self.name,
            "preset": self.preset,
            "config": self.config,
            "backbone_info": self.backbone_info,
            "history": self.history,
            "state": self.state(),
        }))

    def describe(self) -> str:
        bi = self.backbone_info or {}
        return f"{self.name} ({self.preset} preset), backbone {bi.get('name')} [{bi.get('weights')}]"


def _concat(parts: list[Prediction], det: Detector) -> Prediction:
    if not parts:
        s = det.config.get("map_size", 1)
        return Prediction(np.zeros(0, np.float32), np.zeros((0, s, s), np.float32), np.zeros((0, 0), np.float32))
    extra = {}
    for k in parts[0].extra:
        extra[k] = np.concatenate([p.extra[k] for p in parts])
    return Prediction(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.maps for p in parts]),
        np.concatenate([p.embeddings for p in parts]),
        parts[0].embedding_kind,
        extra=extra,
    )


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, str]:
    """name -> one-line description, in registration order."""
    _import_all()
    return {k: v.description for k, v in REGISTRY.items()}


def make_detector(name: str, preset: str = "quick", overrides: dict | None = None) -> Detector:
    _import_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name](preset=preset, overrides=overrides)


def load_detector(path: str | Path, device: str = "auto") -> Detector:
    """Rebuild a saved detector for inference (no weight download, no training data).

    Every model file goes through ``modelfile.read_model``'s checks; anything refused raises
    ``ModelFileError`` (a ValueError) with one sentence for the user."""
    from ..modelfile import ModelFileError, read_model

    _import_all()
    blob = read_model(path)
    cls = REGISTRY.get(blob["method"])
    if cls is None:
        raise ModelFileError(f"{path} holds a {blob['method'][:80]!r} model, which this version does not know")
    try:
        det = cls(preset=blob["preset"])
        det.config.update(blob["config"])
        det.config["device"] = device
        det.backbone_info = blob["backbone_info"]
        det.history = blob["history"]
        det.load_state(blob["state"])
    except ModelFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        # the hash proves the tensors are as written, not that the manifest fits this method
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"model file {path} does not fit its method {blob['method']!r}: {msg}") from None
    det.fitted = True
    return det


# Registration order = the order methods are offered in the app and the CLI.
# DRA first: the app's default, robust and minutes on a CPU with the quick preset.
METHOD_MODULES = ("dra", "ahl", "saliencycut", "devnet", "bgad", "ckaad", "fusion")


def _import_all() -> None:
    """Import every method module (each registers itself); lazily, so `import osad_core` stays light."""
    import importlib
    import pkgutil

    from .. import methods as pkg

    present = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    for name in METHOD_MODULES:
        if name in present:
            importlib.import_module(f"{pkg.__name__}.{name}")

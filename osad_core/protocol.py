"""The papers' evaluation protocols (DRA's, followed by DevNet, AHL and SaliencyCut).

- general: M labelled anomalies drawn from all anomalies of the test split (any class),
  removed from the test set;
- hard: M labelled anomalies drawn from one known class; every image of that class is
  removed from the test set, so all test anomalies are of unseen classes;
- shots 0 gives the anomaly-free setting.

Draw as the official code does (``numpy.random.RandomState(seed).shuffle`` of the
anomaly files, first M), except that file names are sorted first so the draw does not
depend on the filesystem's listing order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .data import Dataset, DataError, ImageRecord, require_normal_training

SETTINGS = ("general", "hard")


@dataclass
class Protocol:
    setting: str = "general"
    shots: int = 10
    seed: int = 42
    known_class: str | None = None  # hard setting only

    def to_dict(self) -> dict:
        d = asdict(self)
        d["draw"] = "RandomState(seed).shuffle of sorted anomaly paths, first `shots`"
        return d

    def describe(self) -> str:
        s = f"{self.setting}, {self.shots} shot{'s' if self.shots != 1 else ''}, seed {self.seed}"
        return s + (f", known class {self.known_class}" if self.known_class else "")


@dataclass
class Split:
    train_normal: list[ImageRecord]
    train_anomalies: list[ImageRecord]
    test: list[ImageRecord]
    protocol: Protocol
    seen_types: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[ImageRecord]:
        return self.train_normal + self.train_anomalies

    def summary(self) -> str:
        t_an = sum(r.label == 1 for r in self.test)
        return (f"train {len(self.train_normal)} normal + {len(self.train_anomalies)} anomalies "
                f"({', '.join(self.seen_types) or 'none'}); test {len(self.test) - t_an} normal + {t_an} anomalies")


def make_split(ds: Dataset, protocol: Protocol, require_test: bool = True) -> Split:
    """Apply a protocol to a dataset; every impossible request is a :class:`DataError`.

    Anomalies already labelled in the train split (tagged in the app) are used first;
    only the remaining shots are drawn from the held-out anomalies.
    """
    if protocol.setting not in SETTINGS:
        raise DataError(f"unknown setting {protocol.setting!r}; choose general or hard")
    if protocol.shots < 0:
        raise DataError("shots must be 0 or more")
    require_normal_training(ds)
    train_normal = ds.select(split="train", label=0)
    test_normal = ds.select(split="test", label=0)
    # labelled anomalies in the train split (e.g. tagged in the app) are always used
    tagged = ds.select(split="train", label=1)
    pool = sorted(ds.select(split="test", label=1), key=lambda r: r.path)
    rng = np.random.RandomState(protocol.seed)

    if protocol.setting == "general":
        if protocol.known_class:
            raise DataError("a known class is only used in the hard setting")
        if protocol.shots > len(pool) + len(tagged):
            raise DataError(
                f"{ds.name} has {len(pool) + len(tagged)} anomalous images, fewer than the {protocol.shots} "
                "labelled anomalies requested"
            )
        need = max(0, protocol.shots - len(tagged))
        idx = np.arange(len(pool))
        rng.shuffle(idx)
        drawn = [pool[i] for i in idx[:need]]
        kept = [pool[i] for i in sorted(idx[need:])]
        train_an = tagged[: protocol.shots] if protocol.shots <= len(tagged) else tagged + drawn
        test = test_normal + kept
    else:
        classes = sorted({r.defect_type for r in pool + tagged})
        if len(classes) < 2:
            raise DataError(f"the hard setting needs at least two anomaly classes; {ds.name} has {len(classes)}")
        if protocol.known_class not in classes:
            raise DataError(
                f"unknown class {protocol.known_class!r} for the hard setting; {ds.name} has: {', '.join(classes)}"
            )
        known = [r for r in pool if r.defect_type == protocol.known_class]
        known_tagged = [r for r in tagged if r.defect_type == protocol.known_class]
        if protocol.shots > len(known) + len(known_tagged):
            raise DataError(
                f"class {protocol.known_class} has {len(known) + len(known_tagged)} images, fewer than the "
                f"{protocol.shots} labelled anomalies requested"
            )
        need = max(0, protocol.shots - len(known_tagged))
        idx = np.arange(len(known))
        rng.shuffle(idx)
        train_an = (known_tagged + [known[i] for i in idx[:need]])[: protocol.shots]
        test = test_normal + [r for r in pool if r.defect_type != protocol.known_class]

    if require_test and (not any(r.label == 1 for r in test) or not any(r.label == 0 for r in test)):
        raise DataError(
            f"{ds.name}: the held-out test set needs both normal and anomalous images under {protocol.describe()} "
            "(hold out some labelled images for testing)"
        )
    seen = sorted({r.defect_type for r in train_an if r.defect_type})
    return Split(train_normal, list(train_an), test, protocol, seen)

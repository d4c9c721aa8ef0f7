"""Image records, dataset importers and the decoded-image cache.

A dataset is a flat list of :class:`ImageRecord`; the MVTec layout
(``train/good``, ``test/good``, ``test/<defect type>``, ``ground_truth/<type>/*_mask.png``)
maps onto it directly. Importers for the ELPV package and the HeadCT folder produce the
same records, so every method and the app see one shape of data.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .safeio import IMAGE_EXTENSIONS, LARGE_PIXELS, inside, read_image, read_mask, utf8_name  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

NORMAL = "good"  # MVTec name of the normal class



@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int  # 0 normal, 1 anomaly, -1 unlabelled
    defect_type: str | None = None  # None for normal / unlabelled
    split: str = "train"  # train | test
    mask_path: str | None = None
    image_id: int | None = None  # database id when the record came from a project

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Dataset:
    name: str
    records: list[ImageRecord]
    root: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def select(self, split=None, label=None, defect_type=None) -> list[ImageRecord]:
        return [
            r for r in self.records
            if (split is None or r.split == split)
            and (label is None or r.label == label)
            and (defect_type is None or r.defect_type == defect_type)
        ]

    @property
    def defect_types(self) -> list[str]:
        return sorted({r.defect_type for r in self.records if r.label == 1 and r.defect_type})

    def summary(self) -> str:
        n = lambda **k: len(self.select(**k))  # noqa: E731
        types = ", ".join(f"{t} {n(label=1, defect_type=t)}" for t in self.defect_types)
        return (f"{self.name}: {n(split='train', label=0)} normal train, {n(split='test', label=0)} normal test, "
                f"{n(label=1)} anomalous ({types})")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def more_images_than(root: str | Path, n: int) -> bool:
    """Whether a folder holds more than ``n`` image names (hidden folders left out);
    stops counting at ``n + 1``, so a huge folder answers as fast as a small one. Names
    only: nothing is opened or checked (:func:`load_folder` does that)."""
    count = 0
    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        if count > n:
            return True
    return False


class _Lister:
    """Lists a folder's images, leaving out (and noting) names that are not UTF-8 and, when
    confined to a root, anything whose links lead out of it or into a hidden folder."""

    def __init__(self, confine_to: Path | None):
        self.confine_to = confine_to
        self.skipped: list[tuple[str, str]] = []

    def ok(self, p: Path) -> bool:
        if not utf8_name(p):
            shown = os.fsencode(p.name).decode("utf-8", "replace")
            self.skipped.append((os.fsencode(str(p)).decode("utf-8", "replace"),
                                 f"`{shown}` was skipped: its name is not valid UTF-8"))
            return False
        if self.confine_to is not None and not inside(p, self.confine_to):
            self.skipped.append((str(p), f"`{p.name}` was skipped: it links outside the folders allowed"))
            return False
        return True

    def images(self, folder: Path) -> list[Path]:
        # sorted so every protocol draw is independent of the filesystem's order
        return sorted((p for p in folder.iterdir() if _is_image(p) and self.ok(p)), key=lambda p: p.name)

    def tree(self, root: Path) -> list[Path]:
        """Every image below ``root``, hidden folders left out (never descended into)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [p for f in filenames if _is_image(p := Path(dirpath) / f) and self.ok(p)]
        return sorted(out, key=str)

    def mask(self, root: Path, defect: str, img: Path) -> str | None:
        gt = root / "ground_truth" / defect
        if not gt.is_dir():
            return None
        for cand in (gt / f"{img.stem}_mask.png", gt / f"{img.stem}.png", gt / img.name):
            if cand.is_file() and (self.confine_to is None or inside(cand, self.confine_to)):
                return str(cand)
        return None


def load_folder(path: str | Path, name: str | None = None, confine_to: str | Path | None = None) -> Dataset:
    """Load an MVTec-layout folder, or a flat folder of images (all unlabelled).

    Hidden folders and files are left out; names that are not UTF-8 are skipped and
    listed in ``Dataset.skipped``. ``confine_to``: a root that no image may lead out of
    through a link (the app's server-folder import). Raises :class:`DataError` with a
    one-sentence reason when the folder cannot be used.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"`{root}` does not exist")
    if not root.is_dir():
        raise DataError(f"`{root}` is not a folder")
    name = name or root.name
    ls = _Lister(Path(confine_to).resolve() if confine_to is not None else None)
    train_good = root / "train" / NORMAL
    recs: list[ImageRecord] = []
    if train_good.is_dir() or (root / "test").is_dir():
        if train_good.is_dir():
            recs += [ImageRecord(str(p), 0, None, "train") for p in ls.images(train_good)]
        test = root / "test"
        if test.is_dir():
            subs = [d for d in test.iterdir() if d.is_dir() and not d.name.startswith(".") and ls.ok(d)]
            for sub in sorted(subs):
                for p in ls.images(sub):
                    if sub.name == NORMAL:
                        recs.append(ImageRecord(str(p), 0, None, "test"))
                    else:
                        recs.append(ImageRecord(str(p), 1, sub.name, "test", ls.mask(root, sub.name, p)))
    else:
        recs = [ImageRecord(str(p), -1, None, "train") for p in ls.tree(root)]
    if not recs:
        raise DataError(
            f"`{root}` has no images (looked for {' '.join(IMAGE_EXTENSIONS[:5])} … in train/good, "
            "test/<type>, or the folder itself)"
        )
    return Dataset(name, recs, str(root), ls.skipped)


def describe_dataset(ds: Dataset) -> str:
    """One line saying what was recognised in a folder."""
    labelled = [r for r in ds.records if r.label >= 0]
    if not labelled:
        return f"{len(ds.records)} unlabelled images (flat folder)"
    tr = len(ds.select(split="train", label=0))
    te = len(ds.select(split="test", label=0))
    an = len(ds.select(label=1))
    types = ", ".join(ds.defect_types) or "none"
    unl = len(ds.records) - len(labelled)
    extra = f", {unl} unlabelled" if unl else ""
    return f"MVTec layout: {tr} normal for training, {te} normal held out, {an} anomalies ({types}){extra}"


def require_normal_training(ds: Dataset) -> None:
    if not ds.select(split="train", label=0):
        raise DataError(f"{ds.name} has no normal training images (expected images in train/good)")


# --------------------------------------------------------------------------------------
# importers
# --------------------------------------------------------------------------------------
def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DataError("the ELPV images need the package elpv-dataset: pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _split_75_25(items: list, seed: int = 42) -> tuple[list, list]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(items, test_size=0.25, random_state=seed)
    return list(train), list(test)


def import_elpv(include_uncertain: bool = False) -> Dataset:
    """ELPV as the DRA/AHL papers convert it.

    Normal = defect probability 0, split 75/25 with ``train_test_split(random_state=42)`` in
    CSV order; anomalies = probability 1, classes ``mono``/``poly`` by cell type. Cells with
    probability 1/3 or 2/3 are left out (or kept unlabelled with ``include_uncertain``).
    """
    root = elpv_root()
    rows = []
    with open(root / "labels.csv") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], float(parts[1]), parts[2]))
    normals = [r for r in rows if r[1] == 0.0]
    train, test = _split_75_25(normals)
    recs = [ImageRecord(str(root / p), 0, None, "train") for p, _, _ in train]
    recs += [ImageRecord(str(root / p), 0, None, "test") for p, _, _ in test]
    recs += [ImageRecord(str(root / p), 1, t, "test") for p, pr, t in rows if pr == 1.0]
    if include_uncertain:
        recs += [ImageRecord(str(root / p), -1, None, "test") for p, pr, _ in rows if 0 < pr < 1]
    return Dataset("elpv", recs, str(root))


def default_headct_path() -> Path:
    """``OSAD_HEADCT_DIR``, else ``../shared/datasets/headct`` beside the repository."""
    env = os.environ.get("OSAD_HEADCT_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets" / "headct"


def import_headct(path: str | Path | None = None) -> Dataset:
    """HeadCT in MVTec layout (75 train normals, 25 test normals, 100 haemorrhage)."""
    p = Path(path) if path else default_headct_path()
    ds = load_folder(p, "headct")
    return ds


def resolve_dataset(spec: str) -> Dataset:
    """``elpv``, ``headct`` or a folder path."""
    if spec == "elpv":
        return import_elpv()
    if spec == "headct":
        return import_headct()
    return load_folder(spec)


# --------------------------------------------------------------------------------------
# decoding and cache
# --------------------------------------------------------------------------------------
def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageCache:
    """Decoded, resized uint8 images (H, W, 3), decoded once per (path, size).

    An in-memory LRU bounded in bytes; safe to share between threads.
    """

    def __init__(self, max_bytes: int = 3 << 30):
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, size: int, keep: bool = True) -> np.ndarray:
        """The decoded image; ``keep=False`` (images seen once, e.g. bulk scoring) leaves
        the cache as it was, so its memory does not grow with the number scored."""
        key = (str(path), int(size))
        with self._lock:
            arr = self._d.get(key)
            if arr is not None:
                self._d.move_to_end(key)
                return arr
        # squash to size x size (the papers' resize; aspect ratio not kept); only a very
        # large JPEG is decoded reduced, so ordinary images give exactly the pixels they did
        im = read_image(path, reduce_to=size, reduce_above=LARGE_PIXELS)
        arr = np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)
        arr.setflags(write=False)
        if not keep:
            return arr
        with self._lock:
            if key not in self._d:
                self._d[key] = arr
                self._bytes += arr.nbytes
                while self._bytes > self.max_bytes and len(self._d) > 1:
                    _, old = self._d.popitem(last=False)
                    self._bytes -= old.nbytes
        return arr

    def load_many(self, records: list[ImageRecord], size: int, keep: bool = True
                  ) -> tuple[np.ndarray, list[ImageRecord], list[tuple[str, str]]]:
        """Stack readable images; unreadable ones are reported and skipped, never fatal."""
        arrs, ok, bad = [], [], []
        for r in records:
            try:
                arrs.append(self.get(r.path, size, keep))
                ok.append(r)
            except DataError as exc:
                log.warning("skipping %s", exc)
                bad.append((r.path, str(exc)))
        out = np.stack(arrs) if arrs else np.zeros((0, size, size, 3), np.uint8)
        return out, ok, bad


IMAGE_CACHE = ImageCache()


def with_label(rec: ImageRecord, **changes) -> ImageRecord:
    return replace(rec, **changes)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        Path(path).write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)

"""Score images with an exported ONNX model and ``onnxruntime`` alone: no torch import here.

    model = OnnxModel("dra.onnx")            # reads dra.onnx.json (checks the sha256) or the
    scores, maps, records, skipped = model.predict(paths)   # manifest inside the model
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .data import IMAGE_CACHE, DataError, ImageRecord


def read_manifest(path: str | Path) -> dict:
    """The manifest next to the model (hash checked), else the one in its metadata."""
    path = Path(path)
    side = Path(str(path) + ".json")
    if side.is_file():
        man = json.loads(side.read_text())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if man.get("onnx_sha256") not in (None, digest):
            raise DataError(f"{path.name} does not match the sha256 in {side.name}: the model file was changed")
        return man
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    if "osad_manifest" not in meta:
        raise DataError(f"{path.name} is not an ONNX model exported by OSAD Studio (no manifest)")
    return json.loads(meta["osad_manifest"])


class OnnxModel:
    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        self.path = path
        self.manifest = read_manifest(path)
        pre = self.manifest["preprocess"]
        if pre.get("channel_order") != "RGB" or pre.get("layout") != "NCHW":
            raise DataError(f"{path.name} expects {pre.get('channel_order')}/{pre.get('layout')} input, "
                            "which this version does not prepare")
        self.size = int(pre["size"])
        self.scale = float(pre["scale"])
        self.mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    @property
    def operating_point(self) -> dict | None:
        return self.manifest.get("operating_point")

    def describe(self) -> str:
        bb = self.manifest.get("backbone") or {}
        return f"{self.manifest['method']} ({self.manifest['preset']} preset, ONNX), backbone {bb.get('name')}"

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB -> normalised float32 (N, 3, S, S), as the manifest says."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) * np.float32(self.scale)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for i in range(0, len(images), batch_size):
            s, m = self.session.run(["score", "map"], {"image": self.preprocess(images[i:i + batch_size])})
            scores.append(s)
            maps.append(m)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    def predict(self, records: list, batch_size: int = 32, cache: bool = True):
        """(scores, maps, readable records, skipped (path, reason)) for records or paths;
        ``cache=False`` keeps no decoded image (bulk scoring)."""
        recs = [r if isinstance(r, ImageRecord) else ImageRecord(str(r), -1) for r in records]
        scores, maps, ok, skipped = [], [], [], []
        for i in range(0, len(recs), 256):  # decode in chunks, as the PyTorch path does
            arr, good, bad = IMAGE_CACHE.load_many(recs[i:i + 256], self.size, keep=cache)
            ok += good
            skipped += bad
            if len(good):
                s, m = self.predict_arrays(arr, batch_size)
                scores.append(s)
                maps.append(m)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32), ok, skipped
        return np.concatenate(scores), np.concatenate(maps), ok, skipped

"""Export a fitted detector to ONNX: normalised image tensor -> (score, anomaly map).

The graph holds the detector only. Preprocessing (resize, scale, ImageNet mean/std, RGB,
NCHW) and the operating point stay outside it, in a JSON manifest written next to the
model (``X.onnx.json``, with the model's sha256) and copied into the ONNX
``metadata_props`` (without the hash, which cannot hash itself). A line PC then scores
with ``onnxruntime`` alone (:mod:`osad_core.onnx_model`).

A method exports when it defines ``export_forward(x) -> (scores (N,), maps (N, h, w))``
on a normalised float tensor; one whose scoring is not a traced graph says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .methods.base import Detector

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "osad-onnx"
MANIFEST_VERSION = 1
OPSET = 17


class NotExportable(ValueError):
    """This detector cannot be written as an ONNX graph (the reason is the message)."""


def exportable(det: Detector) -> str | None:
    """None when ``det`` can be exported, else the one-sentence reason it cannot."""
    if getattr(det, "export_forward", None) is None:
        why = getattr(det, "not_exportable_reason", "its scoring is not a single traced graph")
        return f"{det.name} models cannot be exported to ONNX: {why}"
    return None


class _Graph(nn.Module):
    def __init__(self, det: Detector):
        super().__init__()
        self.det = det
        # the detector's modules (and a wrapped base detector's), registered so tracing
        # sees their parameters as parameters rather than constants
        self.parts = nn.ModuleList(_modules(det))

    def forward(self, image: torch.Tensor):
        return self.det.export_forward(image)


def _modules(det: Detector) -> list[nn.Module]:
    out = []
    for v in vars(det).values():
        if isinstance(v, nn.Module):
            out.append(v)
        elif isinstance(v, Detector):
            out += _modules(v)
    return out


def manifest(det: Detector) -> dict:
    c = det.config
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "method": det.name, "preset": det.preset, "backbone": det.backbone_info,
        "operating_point": c.get("operating_point"),
        "preprocess": {
            "size": c["image_size"], "resize": "the image reader of OSAD Studio (osad_core.data.ImageCache)",
            "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
        },
        "inputs": {"image": "float32 (N, 3, size, size), (pixel / 255 - mean) / std"},
        "outputs": {"score": "float32 (N,), larger = more anomalous",
                    "map": f"float32 (N, {c['map_size']}, {c['map_size']}) anomaly map"},
        "threshold_note": "the operating point is not in the graph: flag a part when score >= threshold",
    }


def export_onnx(det: Detector, out: str | Path) -> dict:
    """Write ``out`` (.onnx) and ``out`` + ``.json`` (the manifest); returns the manifest."""
    reason = exportable(det)
    if reason:
        raise NotExportable(reason)
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = _Graph(det).eval().cpu()
    getattr(det, "prepare_export", lambda: None)()
    S = det.config["image_size"]
    x = torch.zeros(2, 3, S, S)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (x,), str(out), input_names=["image"], output_names=["score", "map"],
                          dynamic_axes={"image": {0: "n"}, "score": {0: "n"}, "map": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
    man = manifest(det)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = "osad_manifest", json.dumps(man)
    onnx.save(model, str(out))
    man["onnx_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    Path(str(out) + ".json").write_text(json.dumps(man, indent=2))
    return man


def parity(ref_scores, ref_maps, scores, maps, score_unit: float) -> dict:
    """How far an exported model's outputs are from PyTorch's, relative to a meaningful size.

    Score difference: ``|s_onnx - s_torch| / max(|s_torch|, score_unit)`` per image, where
    ``score_unit`` is the spread (standard deviation) of PyTorch's scores on held-out normal
    images. Fusion's z-scores and the deviation-score sums of DRA, DevNet, SaliencyCut and AHL
    cross 0, where ``|Δ| / |s|`` grows without bound for any float32 rounding; the normals'
    spread is the unit the operating point is read in, so a difference below 1e-4 of it moves
    no part across the threshold unless it lies within 1e-4 of a spread from it.
    Map difference: the same with the spread of PyTorch's map values over the images.
    """
    tiny = np.finfo(np.float32).tiny
    ref_scores, scores = np.asarray(ref_scores, np.float64), np.asarray(scores, np.float64)
    ref_maps, maps = np.asarray(ref_maps, np.float64), np.asarray(maps, np.float64)
    ds, dm = np.abs(scores - ref_scores), np.abs(maps - ref_maps)
    map_unit = float(ref_maps.std())
    return {
        "score_unit": float(score_unit), "map_unit": map_unit,
        "max_rel_score_diff": float(np.max(ds / np.maximum(np.abs(ref_scores), max(score_unit, tiny)))),
        "max_abs_score_diff": float(ds.max()),
        # the plain |Δ| / |s|, for comparison: large only where a score is near 0
        "max_rel_score_diff_pointwise": float(np.max(ds / np.maximum(np.abs(ref_scores), tiny))),
        "max_rel_map_diff": float(np.max(dm / np.maximum(np.abs(ref_maps), max(map_unit, tiny)))),
        "max_abs_map_diff": float(dm.max()),
    }

"""One training run end to end: split -> fit -> score the test set -> metrics.

Shared by the CLI, the benchmark and the worker so a number means the same everywhere.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .data import Dataset
from .evaluate import METRIC_DETAILS, best_f1_threshold, curves, evaluate_prediction, tsne_2d
from .methods.base import Detector, Prediction, make_detector
from .operating_point import (DEFAULT_CALIBRATION_FRACTION, DEFAULT_TARGET_FRR, OperatingPoint,
                              conformal_threshold, split_calibration)
from .protocol import Protocol, Split, make_split
from .train import Callbacks

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    detector: Detector
    split: Split
    prediction: Prediction  # of split.test (readable images only)
    metrics: dict
    curves: dict
    threshold: float | None  # the operating point's when there are calibration normals, else best F1 on test
    tsne: np.ndarray | None  # (len(tsne_records), 2) or None
    tsne_records: list = field(default_factory=list)  # records of train + test embeddings, in tsne order
    tsne_embeddings: np.ndarray | None = None
    train_prediction: Prediction | None = None
    extra_prediction: Prediction | None = None  # images scored beyond train/test (e.g. unlabelled)
    train_seconds: float = 0.0
    infer_seconds: float = 0.0
    images_per_s: float = 0.0
    calibration_prediction: Prediction | None = None  # training normals held out from fitting
    operating_point: OperatingPoint | None = None
    best_f1_threshold: float | None = None  # reference only: chosen on the test labels

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every image left out because it could not be read, once each."""
        seen: dict[str, str] = {}
        for path, why in list(getattr(self.detector, "skipped_train", [])) + [
                x for p in (self.train_prediction, self.prediction, self.extra_prediction) if p is not None
                for x in p.skipped]:
            seen.setdefault(path, why)
        return list(seen.items())

    def summary(self) -> dict:
        bi = self.detector.backbone_info or {}
        return {
            "method": self.detector.name,
            "preset": self.detector.preset,
            "protocol": self.split.protocol.to_dict(),
            "backbone": bi.get("name"),
            "weights": bi.get("weights"),
            "device": self.detector.device_name,
            "metrics": self.metrics,
            "train_seconds": round(self.train_seconds, 2),
            "infer_seconds": round(self.infer_seconds, 2),
            "images_per_s": round(self.images_per_s, 2),
            "n_train_normal": len(self.split.train_normal),
            "n_calibration": len(self.calibration_prediction.records) if self.calibration_prediction else 0,
            "operating_point": self.operating_point.to_dict() if self.operating_point else None,
            "n_train_anomaly": len(self.split.train_anomalies),
            "n_test": len(self.prediction.records),
            "seen_types": self.split.seen_types,
            "n_skipped": len(self.skipped),
        }


def run_experiment(
    dataset: Dataset,
    protocol: Protocol,
    method: str,
    preset: str = "quick",
    overrides: dict | None = None,
    callbacks: Callbacks | None = None,
    with_tsne: bool = True,
    score_train: bool = True,
    score_also: list | None = None,
    require_test: bool = True,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    target_frr: float = DEFAULT_TARGET_FRR,
) -> RunResult:
    """Train ``method`` under ``protocol`` and evaluate it on the protocol's test split.

    ``score_also``: further records (e.g. unlabelled images) to score, map and embed.
    ``require_test=False`` trains even without a labelled test set (metrics stay empty).
    ``calibration_fraction`` of the training normals is held out from fitting and sets the
    operating point at ``target_frr`` (see :mod:`osad_core.operating_point`).
    """
    split = make_split(dataset, protocol, require_test=require_test)
    fit_normal, calibration = split_calibration(split.train_normal, calibration_fraction, protocol.seed)
    split = replace(split, train_normal=fit_normal)
    overrides = dict(overrides or {})
    overrides.setdefault("seed", protocol.seed)
    det = make_detector(method, preset, overrides)
    log.info("%s: %s", dataset.name, split.summary())
    t0 = time.monotonic()
    det.fit(split.train_normal, split.train_anomalies, callbacks)
    train_s = time.monotonic() - t0

    cb = callbacks or Callbacks()
    cb.status(f"scoring {len(split.test)} held-out images")
    t0 = time.monotonic()
    pred = det.predict(split.test, batch_size=det.config.get("test_batch_size", 32), callbacks=callbacks)
    infer_s = time.monotonic() - t0
    metrics = evaluate_prediction(pred.records, pred.scores, pred.maps, split.seen_types,
                                  base_scores=pred.extra.get("base_score"))
    labels = np.array([r.label for r in pred.records])
    crv = curves(labels, pred.scores)
    best_f1 = best_f1_threshold(labels, pred.scores)
    if best_f1 is not None:
        metrics["best_f1_threshold"] = best_f1

    cal_pred, op = None, None
    if calibration:
        cb.status(f"scoring {len(calibration)} held-out normal images for the operating point")
        cal_pred = det.predict(calibration, batch_size=det.config.get("test_batch_size", 32), callbacks=callbacks)
        op = conformal_threshold(cal_pred.scores, target_frr)
    if op is not None and op.threshold is None:  # no calibration image was readable
        op = None
    if op is not None:
        log.info("operating point %.4f: promised false-reject rate %.4f from %d held-out normals",
                 op.threshold, op.frr, op.n_calibration)
        # travels with the saved model (CLI `score`, ONNX manifest); the scores serve drift checks
        det.config["operating_point"] = dict(op.to_dict(), calibration_scores=np.sort(cal_pred.scores).tolist())
        normal = labels == 0
        if normal.any():  # the test normals never set the operating point: an honest check of its promise
            metrics["operating_point_frr_promised"] = op.frr
            metrics["operating_point_frr_test"] = float(np.mean(pred.scores[normal] >= op.threshold))
        if (labels == 1).any():
            metrics["operating_point_recall_test"] = float(np.mean(pred.scores[labels == 1] >= op.threshold))
    thr = op.threshold if op is not None and op.threshold is not None else best_f1

    train_pred = None
    emb_recs, embs = list(pred.records), pred.embeddings
    if score_train:
        # training images get scores and embeddings too, so the app can show them on the map
        cb.status(f"scoring {len(split.train)} training images")
        train_pred = det.predict(split.train, batch_size=det.config.get("test_batch_size", 32), callbacks=callbacks)
        emb_recs = list(train_pred.records) + emb_recs
        embs = np.concatenate([train_pred.embeddings, pred.embeddings]) if len(train_pred.records) else embs
        if cal_pred is not None and len(cal_pred.records):
            emb_recs = list(cal_pred.records) + emb_recs
            embs = np.concatenate([cal_pred.embeddings, embs])
    extra_pred = None
    if score_also:
        cb.status(f"scoring {len(score_also)} unlabelled images")
        extra_pred = det.predict(score_also, batch_size=det.config.get("test_batch_size", 32), callbacks=callbacks)
        if len(extra_pred.records):
            emb_recs += list(extra_pred.records)
            embs = np.concatenate([embs, extra_pred.embeddings])
    if with_tsne:
        cb.status(f"t-SNE of {len(embs)} embeddings")
    coords = tsne_2d(embs, seed=protocol.seed) if with_tsne else None
    return RunResult(det, split, pred, metrics, crv, thr, coords, emb_recs, embs, train_pred, extra_pred,
                     train_s, infer_s, len(pred.records) / max(infer_s, 1e-9), cal_pred, op, best_f1)


def metric_detail(name: str) -> str:
    return METRIC_DETAILS.get(name, "")

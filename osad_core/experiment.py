"""One training run end to end: split -> fit -> score the test set -> metrics.

Shared by the CLI, the benchmark and the worker so a number means the same everywhere.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .data import Dataset
from .evaluate import TSNE_STAGE, best_f1_threshold, curves, evaluate_prediction, tsne_2d
from .evaluate import metric_detail as _metric_detail
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


# The stages a run adds after its detector's training stages (weights: expected shares of
# the time, for the progress bar). Results first: the held-out images are scored and the
# run's numbers exist before the training and unlabelled images get their scores, maps
# and the t-SNE map.
TRAINING_SHARE = 0.6
RESULT_STAGES = [("Scoring", 0.15)]
REST_STAGES = [("Scoring other images", 0.15), (TSNE_STAGE, 0.05)]


def job_plan(det: Detector, saving: bool = False) -> list[tuple[str, float]]:
    """The whole run's stages: ``det``'s training, scoring, (saving,) the rest (, saving)."""
    train = det.training_stages()
    total = sum(w for _, w in train) or 1.0
    plan = [(name, TRAINING_SHARE * w / total) for name, w in train] + RESULT_STAGES
    if saving:
        plan.append(("Saving results", 0.03))
    plan += REST_STAGES
    if saving:
        plan.append(("Saving the map", 0.02))
    return plan


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
    The same as :func:`train_and_score` followed by :func:`score_rest`.
    """
    res = train_and_score(dataset, protocol, method, preset, overrides, callbacks, require_test,
                          calibration_fraction, target_frr)
    return score_rest(res, callbacks, with_tsne, score_train, score_also)


def train_and_score(
    dataset: Dataset,
    protocol: Protocol,
    method: str,
    preset: str = "quick",
    overrides: dict | None = None,
    callbacks: Callbacks | None = None,
    require_test: bool = True,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    target_frr: float = DEFAULT_TARGET_FRR,
    saving: bool = False,
    detector: Detector | None = None,
) -> RunResult:
    """The part of a run a person waits for: train, score the held-out test and
    calibration images, metrics, curves and the operating point. Training images,
    unlabelled images and the t-SNE map are left to :func:`score_rest`. ``saving``: the
    caller stores results between the two (its stages join the progress plan).
    ``detector``: one already trained on this split (a job whose results were stored
    before a crash): it is not trained again, only the split and the held-out
    predictions that :func:`score_rest` needs are rebuilt."""
    split = make_split(dataset, protocol, require_test=require_test)
    fit_normal, calibration = split_calibration(split.train_normal, calibration_fraction, protocol.seed)
    split = replace(split, train_normal=fit_normal)
    overrides = dict(overrides or {})
    overrides.setdefault("seed", protocol.seed)
    det = detector or make_detector(method, preset, overrides)
    cb = callbacks or Callbacks()
    cb.plan(job_plan(det, saving))
    log.info("%s: %s", dataset.name, split.summary())
    t0 = time.monotonic()
    if detector is None:
        det.fit(split.train_normal, split.train_anomalies, cb)
    train_s = time.monotonic() - t0

    bs = det.config.get("test_batch_size", 32)
    cb.begin("Scoring", len(split.test) + len(calibration), message="held-out images")
    t0 = time.monotonic()
    pred = det.predict(split.test, batch_size=bs, callbacks=cb)
    infer_s = time.monotonic() - t0
    metrics = evaluate_prediction(pred.records, pred.scores, pred.maps, split.seen_types,
                                  base_scores=pred.extra.get("base_score"), head_scores=det.head_scores(pred))
    metrics.update(det.training_metrics())
    labels = np.array([r.label for r in pred.records])
    crv = curves(labels, pred.scores)
    best_f1 = best_f1_threshold(labels, pred.scores)
    if best_f1 is not None:
        metrics["best_f1_threshold"] = best_f1

    cal_pred, op = None, None
    if calibration:
        cal_pred = det.predict(calibration, batch_size=bs, callbacks=cb)
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
    return RunResult(det, split, pred, metrics, crv, thr, None, [], None, None, None,
                     train_s, infer_s, len(pred.records) / max(infer_s, 1e-9), cal_pred, op, best_f1)


def score_rest(res: RunResult, callbacks: Callbacks | None = None, with_tsne: bool = True,
               score_train: bool = True, score_also: list | None = None) -> RunResult:
    """Scores, maps and embeddings of the training images (``score_train``) and of
    ``score_also`` (e.g. unlabelled images), then the t-SNE map of every embedding (above
    ``evaluate.TSNE_FIT_MAX`` fitted on a fixed sample, the others placed into it; every
    embedding gets coordinates). Fills ``res`` in place and returns it."""
    det, split, cb = res.detector, res.split, callbacks or Callbacks()
    bs = det.config.get("test_batch_size", 32)
    cb.begin("Scoring other images", (len(split.train) if score_train else 0) + len(score_also or ()))
    pred, cal_pred = res.prediction, res.calibration_prediction
    emb_recs, embs = list(pred.records), pred.embeddings
    if score_train:
        # training images get scores and embeddings too, so the app can show them on the map
        res.train_prediction = det.predict(split.train, batch_size=bs, callbacks=cb)
        train_pred = res.train_prediction
        emb_recs = list(train_pred.records) + emb_recs
        embs = np.concatenate([train_pred.embeddings, pred.embeddings]) if len(train_pred.records) else embs
        if cal_pred is not None and len(cal_pred.records):
            emb_recs = list(cal_pred.records) + emb_recs
            embs = np.concatenate([cal_pred.embeddings, embs])
    if score_also:
        res.extra_prediction = det.predict(score_also, batch_size=bs, callbacks=cb)
        if len(res.extra_prediction.records):
            emb_recs += list(res.extra_prediction.records)
            embs = np.concatenate([embs, res.extra_prediction.embeddings])
    res.tsne_records, res.tsne_embeddings = emb_recs, embs
    if with_tsne:
        # the stage reports its own steps (the fit, then the embeddings placed into it)
        res.tsne = tsne_2d(embs, seed=split.protocol.seed, callbacks=cb)
    return res


def metric_detail(name: str) -> str:
    return _metric_detail(name) or ""

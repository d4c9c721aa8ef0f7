"""Metrics and projections: image AUROC/AUPR, curves, seen/unseen split, pixel AUROC, t-SNE.

All metrics come from scikit-learn; anomalies are the positive class.
"""
from __future__ import annotations

import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from .data import ImageRecord, read_mask

MAX_CURVE_POINTS = 300


def _thin(*arrays, n=MAX_CURVE_POINTS):
    """Keep at most n points of a curve (first and last always kept) for storage and plotting."""
    m = len(arrays[0])
    if m <= n:
        return [np.asarray(a).tolist() for a in arrays]
    idx = np.unique(np.linspace(0, m - 1, n).round().astype(int))
    return [np.asarray(a)[idx].tolist() for a in arrays]


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return {}
    return {"image_auroc": float(roc_auc_score(labels, scores)),
            "image_aupr": float(average_precision_score(labels, scores))}


def curves(labels: np.ndarray, scores: np.ndarray) -> dict:
    """ROC (x = FPR, y = TPR) and PR (x = recall, y = precision) points with thresholds."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return {}
    fpr, tpr, th = roc_curve(labels, scores)
    th = np.where(np.isfinite(th), th, np.max(scores) + 1)  # sklearn's first threshold is +inf
    prec, rec, pth = precision_recall_curve(labels, scores)
    pth = np.append(pth, np.max(scores) + 1)  # precision/recall have one more point than thresholds
    return {"roc": tuple(_thin(fpr, tpr, th)), "pr": tuple(_thin(rec, prec, pth))}


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return None
    prec, rec, th = precision_recall_curve(labels, scores)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(th[int(np.argmax(f1))])


def seen_unseen_auroc(records: list[ImageRecord], scores: np.ndarray, seen_types: list[str]) -> dict:
    """AUROC of normals against anomalies of defect types shown in training, and of the others."""
    scores = np.asarray(scores)
    lab = np.array([r.label for r in records])
    normal = lab == 0
    out = {}
    for name, pick in (("seen", True), ("unseen", False)):
        an = np.array([r.label == 1 and ((r.defect_type in seen_types) == pick) for r in records], bool)
        if normal.any() and an.any():
            sel = normal | an
            out[f"image_auroc_{name}"] = float(roc_auc_score(an[sel].astype(int), scores[sel]))
    return out


def pixel_auroc(records: list[ImageRecord], maps: np.ndarray) -> float | None:
    """Pixel AUROC over all test images that have a mask (normals count as all-zero masks),
    at the map resolution; None when no anomalous image has a mask."""
    if not any(r.mask_path for r in records):
        return None
    size = maps.shape[-1]
    ys, ss = [], []
    for r, m in zip(records, maps):
        if r.label == 1 and not r.mask_path:
            continue
        gt = read_mask(r.mask_path, size) if r.mask_path else np.zeros((size, size), np.uint8)
        ys.append(gt.ravel())
        ss.append(np.asarray(m, np.float32).ravel())
    y = np.concatenate(ys)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, np.concatenate(ss)))


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """2-D t-SNE (scikit-learn) of the embeddings; None for fewer than 5 points."""
    n = len(embeddings)
    if n < 5:
        return None
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    init = "pca" if embeddings.shape[1] >= 2 else "random"
    return TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed).fit_transform(
        np.asarray(embeddings, np.float32)
    )


def evaluate_prediction(records: list[ImageRecord], scores, maps, seen_types: list[str]) -> dict:
    """All metrics of one test run, each with how it was obtained."""
    labels = np.array([r.label for r in records])
    keep = labels >= 0
    recs = [r for r, k in zip(records, keep) if k]
    m = image_metrics(labels[keep], np.asarray(scores)[keep])
    m.update(seen_unseen_auroc(recs, np.asarray(scores)[keep], seen_types))
    pa = pixel_auroc(recs, np.asarray(maps)[keep]) if maps is not None and len(maps) else None
    if pa is not None:
        m["pixel_auroc"] = pa
    return m


METRIC_DETAILS = {
    "image_auroc": "ROC AUC of image scores on the held-out labelled test images (anomaly = positive), scikit-learn",
    "image_aupr": "average precision of image scores on the held-out labelled test images, scikit-learn",
    "image_auroc_seen": "ROC AUC of test normals vs test anomalies of defect types shown in training",
    "image_auroc_unseen": "ROC AUC of test normals vs test anomalies of defect types never shown in training",
    "pixel_auroc": "ROC AUC over all pixels of masked test images at the map resolution",
}

"""Metrics and projections: image AUROC/AUPR, curves, seen/unseen split, pixel AUROC, t-SNE.

All metrics come from scikit-learn; anomalies are the positive class.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from .data import DataError, ImageRecord, read_mask

log = logging.getLogger(__name__)

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


def masked_pairs(records: list[ImageRecord], maps: np.ndarray) -> tuple[list, list] | None:
    """(ground-truth masks, maps) of the test images that count for pixel metrics, masks read
    once at the map resolution: normals as all-zero masks, anomalies without a mask left out.
    None when no image has a mask."""
    if not any(r.mask_path for r in records):
        return None
    size = maps.shape[-1]
    gts, ms = [], []
    for r, m in zip(records, maps):
        if r.label == 1 and not r.mask_path:
            continue
        try:
            gts.append(read_mask(r.mask_path, size) if r.mask_path else np.zeros((size, size), np.uint8))
        except DataError as exc:  # an unreadable mask leaves its image out of the pixel metrics
            log.warning("skipping %s", exc)
            continue
        ms.append(np.asarray(m, np.float32))
    return gts, ms


def pixel_auroc(records: list[ImageRecord], maps: np.ndarray, pairs=None) -> float | None:
    """Pixel AUROC over all test images that have a mask (normals count as all-zero masks),
    at the map resolution; None when no anomalous image has a mask."""
    pairs = pairs if pairs is not None else masked_pairs(records, maps)
    if pairs is None:
        return None
    y = np.concatenate([g.ravel() for g in pairs[0]])
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, np.concatenate([m.ravel() for m in pairs[1]])))


TSNE_PCA_DIMS = 50
# Barnes-Hut below 5,000 points, FFT gradients from there (openTSNE switches at 10,000). The
# FFT grid grows with the map's extent, not with N: the 2,624 ELPV embeddings of a Fusion
# run spread to ±60 and took 27.4 CPU s with FFT against 8.3 s with Barnes-Hut; a compact
# 5,000-point mixture took 16.9 s with FFT against 20.9 s (docs/BENCHMARKS.md).
TSNE_FFT_FROM = 5000
# Above this many embeddings the map is fitted on a fixed random sample of this size and
# the others are placed into it (openTSNE's ``transform``): the fit's time and memory stop
# growing with the project, and the Results page draws at most 10,000 points anyway
# (docs/BENCHMARKS.md, "The job's t-SNE stage at 100,000 images").
TSNE_FIT_MAX = 10_000
TSNE_PLACE_CHUNK = 2_000  # embeddings placed per transform call: progress and cancel between chunks
TSNE_REPORT_EVERY = 50  # optimisation steps of the fit between progress reports and cancel checks
TSNE_STAGE = "t-SNE map"


def _tsne_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def tsne_fit_sample(n: int, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of the embeddings the map is fitted on when there are more than
    ``TSNE_FIT_MAX`` (a fixed sample for ``seed``); None when all are fitted."""
    if n <= TSNE_FIT_MAX:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, TSNE_FIT_MAX, replace=False))


def tsne_2d(embeddings: np.ndarray, seed: int = 0, callbacks=None) -> np.ndarray | None:
    """2-D t-SNE of the embeddings; None for fewer than 5 points.

    openTSNE (Poličar et al.): Barnes-Hut gradients below 5,000 points, FFT-interpolated
    ones (Linderman et al.'s FIt-SNE, linear in N) from there on, after PCA to 50
    dimensions as its authors advise; 10,000 embeddings take 24–27 CPU seconds
    (``scripts/bench_ui_speed.py``). Same perplexity and PCA start as the scikit-learn
    t-SNE used before, which stays the fallback where openTSNE is missing; on the digits
    set both give the same neighbourhoods (10-NN accuracy 0.978 vs 0.977).

    Above ``TSNE_FIT_MAX`` embeddings the map (and the PCA) is fitted on a sample of that
    size drawn with ``seed``, and every other embedding is placed into the fitted map with
    openTSNE's ``TSNEEmbedding.transform`` at its documented defaults (perplexity 5 over
    the fitted points only, each new point placed independently of the other new ones,
    250 steps from the median of its 25 nearest fitted points), ``TSNE_PLACE_CHUNK`` at a
    time. Every embedding gets coordinates, in input order.

    ``callbacks`` (a :class:`osad_core.train.Callbacks`): the stage ``TSNE_STAGE`` is begun
    here and reports the fit's optimisation steps, then the embeddings placed
    ("40,000/100,000"), and ``check_cancel`` is asked every ``TSNE_REPORT_EVERY`` steps
    of the fit and after every chunk placed."""
    n = len(embeddings)
    cb = callbacks
    if n < 5:
        if cb is not None:
            cb.begin(TSNE_STAGE, 0, message="too few embeddings for a map")
        return None
    x = np.asarray(embeddings, np.float32)
    sample = tsne_fit_sample(n, seed)
    n_fit = n if sample is None else len(sample)
    perplexity = float(min(30.0, max(2.0, (n_fit - 1) / 3)))
    if x.shape[1] > TSNE_PCA_DIMS and n_fit > TSNE_PCA_DIMS:
        from sklearn.decomposition import PCA

        pca = PCA(TSNE_PCA_DIMS, random_state=seed)
        x = pca.fit_transform(x) if sample is None else pca.fit(x[sample]).transform(x)
    init = "pca" if x.shape[1] >= 2 else "random"
    try:
        from openTSNE import TSNE as OpenTSNE
    except ImportError:
        from sklearn.manifold import TSNE

        if cb is not None:
            cb.begin(TSNE_STAGE, 0, message=f"{n:,} embeddings (scikit-learn)")
        return TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed).fit_transform(x)
    steps = 750  # openTSNE's default fit: 250 early-exaggeration steps, then 500
    fit_x = x if sample is None else x[sample]
    # the whole stage counts optimisation steps when every embedding is fitted; with a
    # sample it counts the embeddings with coordinates, so the fit's steps go in the message
    # (the bar never runs backwards, and the ETA is the placing's own)
    what = (f"optimisation steps of the map of {n:,} embeddings" if sample is None else
            f"fitting the map on a fixed sample of {n_fit:,} of {n:,} embeddings")
    done = [0]

    def fit_step(iteration, error, embedding):
        done[0] = min(steps, done[0] + TSNE_REPORT_EVERY)
        cb.check_cancel()
        if sample is None:
            cb.advance(done[0], message=what)
        else:
            cb.advance(0, message=f"{what} · step {done[0]:,} of {steps:,}")

    tsne = OpenTSNE(perplexity=perplexity, initialization=init, n_jobs=_tsne_threads(), random_state=seed,
                    negative_gradient_method="fft" if n_fit >= TSNE_FFT_FROM else "bh",
                    early_exaggeration_iter=250, n_iter=500,
                    callbacks=None if cb is None else [fit_step], callbacks_every_iters=TSNE_REPORT_EVERY)
    if cb is not None:
        cb.begin(TSNE_STAGE, steps if sample is None else 0, message=what)
    emb = tsne.fit(fit_x.astype(np.float64))
    if sample is None:
        if cb is not None:
            cb.advance(steps, force=True, message=what)
        return np.asarray(emb, dtype=np.float32)

    emb.gradient_descent_params["callbacks"] = None  # transform inherits them; the placing reports for itself
    rest = np.setdiff1d(np.arange(n), sample, assume_unique=True)
    placed = np.empty((len(rest), 2), np.float32)
    what = f"placing the other {len(rest):,} embeddings into the map"
    if cb is not None:
        cb.begin(TSNE_STAGE, n, done=n_fit, message=what)
    for i in range(0, len(rest), TSNE_PLACE_CHUNK):
        part = rest[i:i + TSNE_PLACE_CHUNK]
        # transform centres the fitted map in place (a no-op after the first chunk), so the
        # fitted points' coordinates are read after the last chunk
        placed[i:i + len(part)] = np.asarray(emb.transform(x[part].astype(np.float64)), dtype=np.float32)
        if cb is not None:
            cb.check_cancel()
            cb.advance(n_fit + i + len(part), force=i + len(part) == len(rest), message=what)
    out = np.empty((n, 2), np.float32)
    out[sample] = np.asarray(emb, dtype=np.float32)
    out[rest] = placed
    return out


def evaluate_prediction(records: list[ImageRecord], scores, maps, seen_types: list[str],
                        base_scores=None, head_scores: dict | None = None) -> dict:
    """All metrics of one test run, each with how it was obtained.

    ``base_scores``: a wrapped base model's scores of the same images (AHL's stage-A model),
    reported as ``base_image_auroc`` / ``base_image_aupr`` so one run compares the two.
    ``head_scores``: name -> one head's own scores (larger = more anomalous), reported as
    ``head_<name>_image_auroc`` (which head carries the detector)."""
    labels = np.array([r.label for r in records])
    keep = labels >= 0
    recs = [r for r, k in zip(records, keep) if k]
    m = image_metrics(labels[keep], np.asarray(scores)[keep])
    if base_scores is not None:
        m.update({f"base_{k}": v for k, v in image_metrics(labels[keep], np.asarray(base_scores)[keep]).items()})
    for name, hs in (head_scores or {}).items():
        hm = image_metrics(labels[keep], np.asarray(hs)[keep])
        if "image_auroc" in hm:
            m[f"head_{name}_image_auroc"] = hm["image_auroc"]
    m.update(seen_unseen_auroc(recs, np.asarray(scores)[keep], seen_types))
    pairs = masked_pairs(recs, np.asarray(maps)[keep]) if maps is not None and len(maps) else None
    pa = pixel_auroc(recs, None, pairs) if pairs is not None else None
    if pa is not None:
        m["pixel_auroc"] = pa
        pro = pro_auc(recs, None, pairs=pairs)
        if pro is not None:
            m["pro_auc"] = pro
    return m


METRIC_DETAILS = {
    "image_auroc": "ROC AUC of image scores on the held-out labelled test images (anomaly = positive), scikit-learn",
    "image_aupr": "average precision of image scores on the held-out labelled test images, scikit-learn",
    "image_auroc_seen": "ROC AUC of test normals vs test anomalies of defect types shown in training",
    "image_auroc_unseen": "ROC AUC of test normals vs test anomalies of defect types never shown in training",
    "base_image_auroc": "ROC AUC, as image_auroc, of the wrapped base model (AHL's stage A) on the same test images",
    "base_image_aupr": "average precision, as image_aupr, of the wrapped base model (AHL's stage A)",
    "best_f1_threshold": "reference only: the threshold of best F1 on the test labels themselves (optimistic)",
    "operating_point_frr_promised": "false-reject rate the operating point promises on new good parts "
                                    "(conformal, from training normals held out from fitting)",
    "operating_point_frr_test": "false-reject rate measured at the operating point on the test normals, "
                                "which did not set it",
    "operating_point_recall_test": "share of test anomalies flagged at the operating point",
    "pixel_auroc": "ROC AUC over all pixels of masked test images at the map resolution",
    "reconstruction_kept": "Fusion: 1 if its reconstruction part (CKAAD) was kept, 0 if the gate dropped it: kept "
                           "when gate_reconstruction_auroc >= gate_memory_auroc",
    "gate_memory_auroc": "Fusion's gate: ROC AUC of the labelled training anomalies against the held-out training "
                         "normals, by the normal memory's image score (neither fitted on them)",
    "gate_reconstruction_auroc": "Fusion's gate: ROC AUC of the labelled training anomalies against the held-out "
                                 "training normals, by the reconstruction part trained on normals alone",
    "salient_fraction": "mean share of pixels marked salient (saliency above the threshold) over every pseudo "
                        "anomaly made in training; that share of each pseudo anomaly comes from another normal image",
}


def metric_detail(name: str) -> str | None:
    """How the metric ``name`` was obtained (per-head AUROCs share one sentence)."""
    if name.startswith("head_") and name.endswith("_image_auroc") and name not in METRIC_DETAILS:
        head = name[len("head_"):-len("_image_auroc")]
        return (f"ROC AUC, as image_auroc, of the {head} head's own score alone on the same test images "
                "(a head the total subtracts, such as the normality head, enters negated)")
    return METRIC_DETAILS.get(name)


def pro_curve(gts: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve over a whole test set: (pixel FPR, mean per-region overlap) at every
    distinct threshold of the maps, highest threshold first.

    ``gts``: binary masks (all-zero for normal images); ``maps``: same-shaped score maps.
    Regions are the 8-connected components of each mask; every region counts once,
    whatever its image. The FPR is over all pixels outside the masks. Sorting all pixels
    by score once gives every point of the curve exactly (no threshold grid).
    """
    from scipy import ndimage

    scores, region_w, negative = [], [], []
    n_regions = 0
    for gt, m in zip(gts, maps):
        lab, n = ndimage.label(np.asarray(gt) > 0, structure=np.ones((3, 3), int))
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        w = np.where(lab > 0, 1.0 / sizes[lab], 0.0)  # each region's pixels sum to 1
        scores.append(np.asarray(m, np.float64).ravel())
        region_w.append(w.ravel())
        negative.append((lab == 0).ravel())
        n_regions += n
    if n_regions == 0:
        return np.zeros(0), np.zeros(0)
    s, w, neg = np.concatenate(scores), np.concatenate(region_w), np.concatenate(negative)
    n_neg = max(int(neg.sum()), 1)
    order = np.argsort(-s, kind="stable")
    s, w, neg = s[order], w[order], neg[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last pixel of each run of equal scores
    fpr = np.cumsum(neg)[last] / n_neg
    pro = np.cumsum(w)[last] / n_regions
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def pro_auc(records: list[ImageRecord], maps: np.ndarray, fpr_limit: float = 0.3, pairs=None) -> float | None:
    """Standard whole-test-set PRO (METHODS.md §7.5): area under the exact PRO-vs-FPR curve for
    FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (1.0 = perfect), at the map resolution.

    Images as :func:`pixel_auroc` takes them (normals are all-zero masks, anomalies without a
    mask are left out); None when no test image has a defect region.
    """
    pairs = pairs if pairs is not None else masked_pairs(records, maps)
    if pairs is None:
        return None
    fpr, pro = pro_curve(*pairs)
    if len(fpr) == 0:
        return None
    # cut the piecewise-linear curve at the limit (interpolating the crossing segment)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < len(fpr):
        j = int(keep.sum())
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)  # trapezoids (numpy 1.x and 2.x)


METRIC_DETAILS["pro_auc"] = ("standard PRO: area under per-region overlap vs pixel FPR up to 0.3, divided by 0.3, "
                             "exact curve over all masked test images at the map resolution")

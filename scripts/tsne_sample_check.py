"""Does a t-SNE map fitted on a sample, with the other images placed into it, keep what
the map of every image shows? On real image embeddings of HeadCT, ELPV and magnetic tile.

    .venv/bin/python scripts/tsne_sample_check.py --data headct elpv ../shared/datasets/magnetic_tile \
        --seeds 0 1 2 --fractions 0.25 0.1

The job fits its map on a fixed sample of ``TSNE_FIT_MAX`` (10,000) embeddings and places
the others with openTSNE's ``transform``; none of the three data sets has 10,000 images, so
here the cap is set to a fraction of each (a quarter: 10,000 of 40,000; a tenth: 10,000 of
100,000) and the placed map is compared with the map fitted on every embedding, same seed.

Embeddings: every image of the data set through Fusion's frozen extractor at the quick
preset's 256 px (the backbone and layers of its defaults, pretrained weights), patch
features averaged over the image and standardised per channel over the data set (Fusion
standardises by its training normals' statistics; this needs no training). Measures, per
data set, seed and version: seconds, trustworthiness at 10 neighbours of the 2-D map
against the 50 principal components the map is computed from (scikit-learn), and the
10-nearest-neighbour accuracy of the images' normal / anomalous label on the map (3-fold).
Embeddings are kept in ``--cache`` so a second run skips the extractor.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def embeddings(spec: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from osad_core.data import IMAGE_CACHE, resolve_dataset
    from osad_core.methods.base import make_detector

    name = Path(spec).name
    f = cache / f"{name}.npz"
    if f.is_file():
        z = np.load(f)
        return z["emb"], z["label"]
    ds = resolve_dataset(spec)
    recs = [r for r in ds.records if r.label in (0, 1)]
    det = make_detector("fusion", "quick", {"device": "cpu"})
    det._build(fresh=True)
    det.extractor.eval()
    size, parts, labels = det.config["image_size"], [], []
    t0 = time.perf_counter()
    for i in range(0, len(recs), 64):
        arr, good, _ = IMAGE_CACHE.load_many(recs[i:i + 64], size, keep=False)
        with torch.no_grad():
            for j in range(0, len(arr), 16):
                parts.append(det._raw_features(arr[j:j + 16]).mean((2, 3)).cpu().numpy())
        labels += [r.label for r in good]
    e = np.concatenate(parts)
    e = (e - e.mean(0)) / (e.std(0) + 1e-6)
    lab = np.asarray(labels)
    print(f"{name}: {len(e):,} embeddings of {e.shape[1]} dimensions in {time.perf_counter() - t0:.0f} s "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, emb=e.astype(np.float32), label=lab)
    return e.astype(np.float32), lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["headct", "elpv", str(REPO.parent / "shared/datasets/magnetic_tile")])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--cache", default="/tmp/osad_tsne_sample_check")
    a = ap.parse_args()

    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from osad_core import evaluate

    full_cap = evaluate.TSNE_FIT_MAX
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'data':14s} {'n':>6s} {'seed':>4s} {'map':24s} {'s':>6s} {'trust@10':>8s} {'10-NN acc':>9s}")
    for spec in a.data:
        e, lab = embeddings(spec, Path(a.cache))
        n = len(e)
        for seed in a.seeds:
            x50 = PCA(min(50, e.shape[1]), random_state=seed).fit_transform(e) if e.shape[1] > 50 else e
            cases = [("every image fitted", full_cap)] + [
                (f"{max(1, round(n * fr)):,} fitted, rest placed", max(1, round(n * fr))) for fr in a.fractions
                if round(n * fr) >= 50]
            for what, cap in cases:
                evaluate.TSNE_FIT_MAX = cap
                t0 = time.perf_counter()
                y = evaluate.tsne_2d(e, seed=seed)
                s = time.perf_counter() - t0
                tw = trustworthiness(x50, y, n_neighbors=10)
                acc = cross_val_score(KNeighborsClassifier(10), y, lab, cv=3).mean()
                print(f"{Path(spec).name:14s} {n:6,d} {seed:4d} {what:24s} {s:6.1f} {tw:8.4f} {acc:9.3f}   "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        evaluate.TSNE_FIT_MAX = full_cap


if __name__ == "__main__":
    main()

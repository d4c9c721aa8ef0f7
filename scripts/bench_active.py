#!/usr/bin/env python
"""Does choosing what to label next beat labelling at random? A simulated labelling loop.

Per data set and seed: a stratified 30 % of the images is the fixed held-out test set.
The rest is the pool. Labelled at the start: 100 random normals (25 of them kept aside,
never trained on, to set the operating point = their 95th score percentile, as the app's
run threshold from held-out normals) and 2 random anomalies; everything else in the pool
is unlabelled, with anomalies thinned to ``--pool-anomalies`` (10 %) of it, because
new parts are mostly good. Each round the detector is retrained on all labels, scores
the unlabelled pool, and ``osad_core.active.select_next`` picks ``--per-round`` images
whose true labels are then revealed. Test AUROC is measured after every round.

Detector (cheap on a shared CPU, and it learns from labels): frozen backbone features
(global average + max pool of levels 2 and 3 of the app's default backbone at
``--size`` px, extracted once and cached) standardised on the labelled normals, and a
DevNet-style head (D→64→1 MLP, deviation loss, balanced batches, 200 Adam steps).
The same features are the embeddings that the diversity step uses.

    python scripts/bench_active.py --data elpv /path/to/magnetic_tile --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from osad_core import augment  # noqa: E402
from osad_core.active import select_next  # noqa: E402
from osad_core.backbones import build_multiscale  # noqa: E402
from osad_core.data import IMAGE_CACHE, resolve_dataset  # noqa: E402
from osad_core.losses import deviation_loss  # noqa: E402

# strategy name -> (select_next strategy, diverse)
ARMS = {
    "random": ("random", False),
    "uncertain+diverse": ("uncertain", True),
    "anomalous+diverse": ("anomalous", True),
    "uncertain (top-k)": ("uncertain", False),
    "anomalous (top-k)": ("anomalous", False),
}


def features(spec: str, size: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, D) pooled features, (N,) labels 0/1 and the backbone description; cached."""
    name = Path(spec).name if spec != "elpv" else "elpv"
    cache = cache_dir / f"{name}_{size}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["x"], z["y"], str(z["backbone"])
    ds = resolve_dataset(spec)
    recs = [r for r in ds.records if r.label in (0, 1)]
    ext, info = build_multiscale("auto", "auto", None, (2, 3))
    feats, labels = [], []
    t0 = time.time()
    for i in range(0, len(recs), 32):
        imgs, ok, _ = IMAGE_CACHE.load_many(recs[i:i + 32], size)
        if not len(ok):
            continue
        with torch.no_grad():
            maps = ext(augment.test_transform(imgs))
        feats.append(torch.cat([torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1) for m in maps], 1).numpy())
        labels += [r.label for r in ok]
        print(f"  {name}: {i + len(ok)}/{len(recs)} images, {time.time() - t0:.0f} s", flush=True)
    x, y = np.concatenate(feats).astype(np.float32), np.array(labels, np.int64)
    backbone = f"{info.name} [{info.weights}]"
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y, backbone=backbone)
    return x, y, backbone


def train_head(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 200):
    """DevNet-style scorer on fixed features; returns a scoring function."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x[y == 0].mean(0), x[y == 0].std(0) + 1e-3
    xt = torch.from_numpy((x - mu) / sd).float()
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-2)
    normal, anomal = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = np.concatenate([rng.choice(normal, 32), rng.choice(anomal, 32)])  # DevNet's balanced batch
        loss = deviation_loss(net(xt[idx]).squeeze(1), torch.from_numpy(y[idx]), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def score(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy((z - mu) / sd).float()).squeeze(1).numpy()
    return score


def simulate(x, y, arm: str, seed: int, rounds: int, per_round: int, pool_anomalies: float):
    """Test AUROC after each round (round 0 = the starting labels) and how many
    anomalies the chosen images held."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(y))
    pool, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
    pool_n, pool_a = pool[y[pool] == 0], pool[y[pool] == 1]
    rng.shuffle(pool_n)
    rng.shuffle(pool_a)
    calib, lab_n, rest_n = pool_n[:25], list(pool_n[25:100]), pool_n[100:]
    lab_a = list(pool_a[:2])
    n_a = int(round(pool_anomalies * len(rest_n) / (1 - pool_anomalies)))
    unl = list(np.concatenate([rest_n, pool_a[2:2 + n_a]]))
    strategy, diverse = ARMS[arm]
    aucs = []
    for rnd in range(rounds + 1):
        lab = np.array(lab_n + lab_a)
        score = train_head(x[lab], y[lab], seed)
        aucs.append(float(roc_auc_score(y[test], score(x[test]))))
        if rnd == rounds:
            return aucs, len(lab_a) - 2
        u = np.array(unl)
        thr = float(np.percentile(score(x[calib]), 95))
        pick = select_next(score(x[u]), x[u], n=per_round, strategy=strategy, threshold=thr,
                           labelled_embeddings=x[lab], diverse=diverse, seed=seed * 100 + rnd)
        for i in u[pick]:
            (lab_a if y[i] == 1 else lab_n).append(int(i))
        chosen = set(int(i) for i in u[pick])
        unl = [i for i in unl if int(i) not in chosen]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["elpv", str(Path(__file__).resolve().parents[2] / "shared" /
                                                                "datasets" / "magnetic_tile")])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--pool-anomalies", type=float, default=0.1)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "osad_studio" / "bench_active")
    p.add_argument("--out", type=Path, default=None, help="JSON file for every number")
    a = p.parse_args()
    out = {}
    for spec in a.data:
        x, y, backbone = features(spec, a.size, a.cache)
        name = Path(spec).name
        print(f"\n### {name}: {len(y)} images ({int(y.sum())} anomalies), features {x.shape[1]}-d from {backbone}, "
              f"{a.size} px; seeds {a.seeds}; {a.rounds} rounds × {a.per_round} labels\n")
        print("| strategy | " + " | ".join(f"round {r}" for r in range(a.rounds + 1)) + " | anomalies found |")
        print("|---|" + "---|" * (a.rounds + 2))
        out[name] = {"backbone": backbone, "images": len(y), "anomalies": int(y.sum()), "arms": {}}
        for arm in ARMS:
            res = [simulate(x, y, arm, s, a.rounds, a.per_round, a.pool_anomalies) for s in a.seeds]
            runs, found = np.array([r[0] for r in res]), [r[1] for r in res]
            out[name]["arms"][arm] = {"auroc": runs.tolist(), "anomalies_found": found}
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(runs.mean(0), runs.std(0))]
            print(f"| {arm} | " + " | ".join(cells) + f" | {np.mean(found):.1f} of {a.rounds * a.per_round} |",
                  flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

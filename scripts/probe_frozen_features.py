#!/usr/bin/env python
"""How far does plain density estimation on frozen backbone features get on a data set?

A diagnostic for the flow-based BGAD: per feature level (strides 4, 8, 16 of the default
backbone) a per-position diagonal Gaussian is fitted to the training normals of a split,
and test images are scored by the maximum (and the mean) of their per-position squared
z-scores. No training, no anomalies: if this is low, BGAD's normal-density model has
little to work with on these features.

    python scripts/probe_frozen_features.py --data headct --sizes 128 256 --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from osad_core import augment  # noqa: E402
from osad_core.backbones import build_multiscale  # noqa: E402
from osad_core.data import IMAGE_CACHE, resolve_dataset  # noqa: E402
from osad_core.protocol import Protocol, make_split  # noqa: E402


def level_features(extractor, records, size: int) -> tuple[list[torch.Tensor], np.ndarray]:
    images, ok, _ = IMAGE_CACHE.load_many(records, size)
    levels: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            for lvl, f in enumerate(extractor(augment.test_transform(images[i:i + 16]))):
                if lvl == len(levels):
                    levels.append([])
                levels[lvl].append(f)
    return [torch.cat(v) for v in levels], np.array([r.label for r in ok])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="headct")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=10, help="labelled anomalies removed from the test set")
    a = p.parse_args()
    split = make_split(resolve_dataset(a.data), Protocol("general", a.shots, a.seed))
    extractor, info = build_multiscale("auto", "imagenet", None, (1, 2, 3))
    extractor.eval()
    print(f"{a.data}, general split seed {a.seed}: {len(split.train_normal)} training normals, "
          f"{len(split.test)} test images; backbone {info.name} [{info.weights}]")
    print("| image px | level | AUROC, max z² | AUROC, mean z² |\n|---|---|---|---|")
    for size in a.sizes:
        train, _ = level_features(extractor, split.train_normal, size)
        test, y = level_features(extractor, split.test, size)
        for lvl, (f, g) in enumerate(zip(train, test)):
            z2 = (((g - f.mean(0)) / (f.std(0) + 1e-3)) ** 2).mean(1).flatten(1)  # (N, h*w)
            print(f"| {size} | {lvl} ({f.shape[2]}×{f.shape[3]}) | {roc_auc_score(y, z2.max(1).values):.3f} | "
                  f"{roc_auc_score(y, z2.mean(1)):.3f} |")


if __name__ == "__main__":
    main()

"""The frozen extractor's features of a fixed set of training images, each computed once.

Methods whose extractor is frozen and whose training images are not augmented (BGAD's and
CKAAD's normals, CKAAD's labelled anomalies) would otherwise run the extractor on the same
image every time a step draws it: a quick CKAAD schedule draws 3,200 images, a project
often has a few hundred. The features are kept while all of them fit in ``limit_mb``;
past that every use computes them afresh, as without a cache.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .train import Callbacks

Features = Callable[[np.ndarray], list[torch.Tensor]]


class FrozenFeatureCache:
    """``take(idx)`` = ``features(images[idx])``, each image's features computed at most once
    (on first use, or all at once with :meth:`fill`). The stored copy sits where the
    features were computed; an image's features may differ from a fresh batch's in the last
    float bit (other batch neighbours), as they would with another thread count."""

    def __init__(self, images: np.ndarray, features: Features, limit_mb: float):
        self.images, self.features = images, features
        self.limit_bytes = float(limit_mb or 0) * 2 ** 20
        self.enabled = self.limit_bytes > 0 and len(images) > 0
        self.levels: list[torch.Tensor] | None = None  # (N, C, h, w) per level, allocated on first use
        self.have = np.zeros(len(images), bool)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.levels) if self.levels else 0

    @torch.no_grad()
    def take(self, idx) -> list[torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        if not self.enabled:
            return self.features(self.images[idx])
        missing = np.unique(idx[~self.have[idx]])
        if len(missing):
            out = self.features(self.images[missing])
            if self.levels is None:
                per_image = sum(o[0].numel() * o.element_size() for o in out)
                if per_image * len(self.images) > self.limit_bytes:
                    self.enabled = False  # too large to keep: computed per use from now on
                    inverse = torch.as_tensor(np.searchsorted(missing, idx), device=out[0].device)
                    return [o[inverse] for o in out]  # ``missing`` is every distinct index here
                self.levels = [o.new_empty((len(self.images),) + tuple(o.shape[1:])) for o in out]
            where = torch.as_tensor(missing, device=self.levels[0].device)
            for level, o in zip(self.levels, out):
                level[where] = o
            self.have[missing] = True
        where = torch.as_tensor(idx, device=self.levels[0].device)
        return [level[where] for level in self.levels]

    def fill(self, batch_size: int, cb: Callbacks | None = None, stage: str = "Normal features") -> None:
        """Compute every image's features now, in batches, reporting progress as ``stage``."""
        if not self.enabled:
            return
        n = len(self.images)
        cb = cb or Callbacks()
        cb.begin(stage, n)
        for i in range(0, n, batch_size):
            cb.check_cancel()
            self.take(np.arange(i, min(n, i + batch_size)))
            if not self.enabled:
                return
            cb.advance(min(n, i + batch_size))

"""Losses shared by the detectors."""
from __future__ import annotations

import torch

DEV_REF_SAMPLES = 5000
DEV_MARGIN = 5.0


def deviation_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    margin: float = DEV_MARGIN,
    n_ref: int = DEV_REF_SAMPLES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DevNet's deviation loss (METHODS.md §0.4).

    z-score each prediction against a fresh N(0, 1) reference sample of ``n_ref`` values;
    normals (t=0) are pulled to |z| = 0, anomalies (t=1) pushed to z >= ``margin``.
    """
    scores = scores.reshape(-1)
    targets = targets.reshape(-1).to(scores.dtype)
    if scores.numel() == 0:
        return scores.sum() * 0.0
    ref = torch.randn(n_ref, generator=generator, device="cpu").to(scores.device, scores.dtype)
    dev = (scores - ref.mean()) / ref.std()
    loss = (1 - targets) * dev.abs() + targets * torch.clamp(margin - dev, min=0)
    return loss.mean()

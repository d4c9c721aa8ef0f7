"""Gaussian smoothing of anomaly maps in PyTorch, equal to SciPy's ``gaussian_filter``.

Methods smooth their maps with SciPy after the network; an ONNX graph cannot call SciPy,
so the exported graph smooths with this: the same kernel (SciPy's, radius
``int(truncate * sigma + 0.5)``) and SciPy's default border (``reflect``: the edge pixel
repeated, d c b a | a b c d | d c b a) as two 1-D convolutions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """SciPy's normalised 1-D Gaussian kernel for ``sigma`` and ``truncate``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x ** 2)
    return phi / phi.sum()


def _reflect_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` values on both sides of ``dim`` by SciPy's ``reflect`` (the edge repeated);
    ``F.pad``'s ``reflect`` leaves the edge out, so the flipped slices are cut by hand."""
    n = x.shape[dim]
    if r > n:
        raise ValueError(f"a Gaussian of radius {r} needs maps of at least {r} pixels, got {n}")
    return torch.cat([x.narrow(dim, 0, r).flip(dim), x, x.narrow(dim, n - r, r).flip(dim)], dim)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """(N, H, W) maps smoothed as ``scipy.ndimage.gaussian_filter(m, sigma, truncate=truncate)``
    smooths each of them (float32 here; SciPy sums in float64: differences ~1e-7)."""
    if sigma <= 0:
        return maps
    k = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=maps.dtype, device=maps.device)
    r = (k.numel() - 1) // 2
    if r == 0:
        return maps
    x = maps[:, None]
    x = F.conv2d(_reflect_pad(x, r, 2), k.view(1, 1, -1, 1))
    x = F.conv2d(_reflect_pad(x, r, 3), k.view(1, 1, 1, -1))
    return x[:, 0]

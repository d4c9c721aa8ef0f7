"""Pseudo-anomaly generators and the DRA-family training transform.

Images enter as uint8 arrays (H, W, 3) already resized to the run's image size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from .backbones import IMAGENET_MEAN, IMAGENET_STD

_JITTER = transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)


def _patch_box(rng: np.random.Generator, h: int, w: int, area=(0.02, 0.15), ratio=(0.3, 1 / 0.3)):
    """Patch size of DRA's CutMix: area U(2 %, 15 %) of the image, log-uniform aspect ratio."""
    a = rng.uniform(*area) * w * h
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    pw = int(min(w, max(1, round(math.sqrt(a * r)))))
    ph = int(min(h, max(1, round(math.sqrt(a / r)))))
    return pw, ph


def cutmix(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None) -> np.ndarray:
    """DRA's "CutMix" (G1): cut a random rectangle, colour-jitter it, paste it elsewhere.

    With ``donor`` the patch comes from another image of the same size (AHL's inter-image
    CutMix, G3, with the donor resized first as METHODS.md recommends).
    """
    h, w = img.shape[:2]
    src = img if donor is None else donor
    pw, ph = _patch_box(rng, h, w)
    sx, sy = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
    patch = Image.fromarray(np.ascontiguousarray(src[sy:sy + ph, sx:sx + pw]))
    patch = np.asarray(_JITTER(patch))
    dx, dy = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
    out = img.copy()
    out[dy:dy + ph, dx:dx + pw] = patch
    return out


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    batch = np.ascontiguousarray(batch)
    if not batch.flags.writeable:  # cached images are read-only; torch wants writable memory
        batch = batch.copy()
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def random_rotate(x: torch.Tensor, gen: torch.Generator | None = None, max_deg: float = 180.0) -> torch.Tensor:
    """Rotate each image by its own uniform angle in [-max_deg, max_deg] (nearest, corners 0).

    One batched ``grid_sample`` instead of a PIL call per image.
    """
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_deg)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train_transform(batch: np.ndarray, gen: torch.Generator | None = None, rotate: bool = True) -> torch.Tensor:
    """Training pipeline of METHODS.md §0.1: rotation (after any synthesis), then normalise."""
    x = to_tensor(batch)
    if rotate:
        x = random_rotate(x, gen)
    return normalize(x)


def test_transform(batch: np.ndarray) -> torch.Tensor:
    return normalize(to_tensor(batch))


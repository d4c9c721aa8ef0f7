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


def uint8_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) as a tensor, sharing a numpy array's memory where it can."""
    if isinstance(batch, torch.Tensor):
        return batch
    batch = np.ascontiguousarray(batch)
    if not batch.flags.writeable:  # cached images are read-only; torch wants writable memory
        batch = batch.copy()
    return torch.from_numpy(batch)


def to_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], on the input's device."""
    return uint8_tensor(batch).permute(0, 3, 1, 2).float().div_(255.0)


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


def train_transform(batch: np.ndarray | torch.Tensor, gen: torch.Generator | None = None,
                    rotate: bool = True) -> torch.Tensor:
    """Training pipeline of METHODS.md §0.1: rotation (after any synthesis), then normalise."""
    x = to_tensor(batch)
    if rotate:
        x = random_rotate(x, gen)
    return normalize(x)


def test_transform(batch: np.ndarray) -> torch.Tensor:
    return normalize(to_tensor(batch))


# --------------------------------------------------------------------------------------
# SaliencyCut (METHODS.md §4.3): a saliency map from an input gradient, and the paste of
# one image's non-salient region into another image.
# --------------------------------------------------------------------------------------
def bspline_kernel(p: int, order: int = 2) -> torch.Tensor:
    """1-D B-spline of ``order`` for upsampling by stride ``p``: a p-box convolved with itself
    ``order`` times (length order*(p-1)+p), scaled so copies shifted by p sum to 1."""
    box = torch.ones(1, 1, p)
    k = box
    for _ in range(order):
        k = F.conv1d(F.pad(k, (p - 1, p - 1)), box)
    return (k / p**order).view(-1)


def saliency_map(grad: torch.Tensor, grid: int = 18, order: int = 2) -> torch.Tensor:
    """Per-image saliency in [0, 1] from an input gradient (B, C, H, W) -> (B, H, W).

    L2 norm over channels, average-pooled to a ``grid`` x ``grid`` grid, smoothed back up
    with a B-spline transposed convolution (stride p = H // grid), resized to H x W and
    min-max scaled per image. A flat gradient gives an all-zero map.
    """
    b, _, h, w = grad.shape
    g = max(1, min(grid, h, w))
    p = max(1, min(h, w) // g)
    sal = grad.detach().float().pow(2).sum(1, keepdim=True).sqrt()
    sal = F.adaptive_avg_pool2d(sal, (g, g))
    k1 = bspline_kernel(p, order).to(sal.device)
    pad = (k1.numel() - p) // 2  # output is exactly g*p, each cell centred on its own p x p block
    sal = F.conv_transpose2d(sal, torch.outer(k1, k1)[None, None], stride=p, padding=pad)
    sal = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    lo = sal.flatten(1).min(1).values.view(b, 1, 1)
    hi = sal.flatten(1).max(1).values.view(b, 1, 1)
    return (sal - lo) / (hi - lo).clamp_min(1e-12)


def saliency_cut(base, insert, salient):
    """SaliencyCut's pseudo anomaly: ``(1 - S) * base + S * insert``.

    ``base`` (x_a) keeps its non-salient region and receives ``insert`` (x_b) where its own
    saliency mask ``salient`` (S_a, boolean) is set. NumPy images are (H, W, C) with an
    (H, W) mask; tensors are (..., C, H, W) with a (..., H, W) mask.
    """
    if isinstance(base, np.ndarray):
        return np.where(np.asarray(salient, bool)[..., None], insert, base).astype(base.dtype)
    return torch.where(salient.bool().unsqueeze(-3), insert, base)


# --------------------------------------------------------------------------------------
# BGAD: foreground masks, RandAugment-style joint image+mask augmentation, defect pasting
# (METHODS.md §5.3). numpy/torch equivalents of the albumentations groups the paper's
# code draws from; geometric operations move the image and its mask together.
# --------------------------------------------------------------------------------------
def _otsu(gray: np.ndarray) -> tuple[float, float]:
    """Otsu threshold of a uint8 image and its effectiveness σ_between² / σ_total² (0..1)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    levels = np.arange(256)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * levels)
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    t = int(np.argmax(between))
    total = float((p * (levels - mu_t) ** 2).sum())
    return t + 0.5, float(between[t] / total) if total > 0 else 0.0


def foreground_mask(img: np.ndarray, min_effectiveness: float = 0.75) -> np.ndarray:
    """Binary foreground (H, W) by grey-level thresholding (BGAD's paper: "grayscale binary
    thresholding"), for objects on a plain background (e.g. a head CT on black).

    Otsu on a blurred grey image; the class that owns most of the border is background.
    Where the histogram is not clearly bimodal (textures, full-frame parts: effectiveness
    below ``min_effectiveness``; a unimodal Gaussian scores 2/π ≈ 0.64) or the object would
    be tiny, the whole image counts as foreground.
    """
    from scipy import ndimage

    h, w = img.shape[:2]
    gray = img.mean(2) if img.ndim == 3 else img.astype(np.float64)
    gray = ndimage.gaussian_filter(gray, max(1.0, min(h, w) / 64)).clip(0, 255).astype(np.uint8)
    t, eff = _otsu(gray)
    full = np.ones((h, w), bool)
    if eff < min_effectiveness:
        return full
    above = gray > t
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    fg = ~above if border.mean() > 0.5 else above
    fg = ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2))
    return fg if fg.mean() >= 0.05 else full


def _warp(img: np.ndarray, mask: np.ndarray, grid: torch.Tensor, border: str = "reflection"):
    """Sample image (bilinear) and mask (nearest) at ``grid`` (1, H, W, 2) in [-1, 1] coords."""
    x = torch.from_numpy(np.array(img, np.float32)).permute(2, 0, 1)[None]  # a copy: inputs may be read-only
    m = torch.from_numpy(np.array(mask, np.float32))[None, None]
    xi = F.grid_sample(x, grid, mode="bilinear", padding_mode=border, align_corners=False)
    mi = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (xi[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy(),
            (mi[0, 0] > 0.5).numpy().astype(np.uint8))


def _identity_grid(h: int, w: int) -> torch.Tensor:
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)[None]


def _optical(img, mask, rng, limit: float = 1.0):
    # radial distortion; `limit` is albumentations' k range for coordinates in [-0.5, 0.5],
    # i.e. k/4 for the [-1, 1] coordinates used here
    g = _identity_grid(*img.shape[:2])
    k = rng.uniform(-limit, limit) / 4
    r2 = (g ** 2).sum(-1, keepdim=True)
    return _warp(img, mask, g * (1 + k * r2))


def _grid_distort(img, mask, rng, cells: int = 5, limit: float = 0.3):
    h, w = img.shape[:2]
    off = torch.from_numpy(rng.uniform(-limit, limit, (1, 2, cells + 1, cells + 1)).astype(np.float32))
    off = F.interpolate(off * (2.0 / cells), size=(h, w), mode="bicubic", align_corners=True)
    return _warp(img, mask, _identity_grid(h, w) + off.permute(0, 2, 3, 1))


def _local_affine(img, mask, rng, scale=(0.03, 0.05), cells: int = 4):
    # stand-in for piecewise-affine: small independent displacements of a coarse lattice
    h, w = img.shape[:2]
    s = rng.uniform(*scale)
    off = torch.from_numpy(rng.normal(0, s, (1, 2, cells, cells)).astype(np.float32)) * 2
    off = F.interpolate(off, size=(h, w), mode="bilinear", align_corners=True)
    return _warp(img, mask, _identity_grid(h, w) + off.permute(0, 2, 3, 1))


def _shift_scale_rotate(img, mask, rng, shift=0.0625, scale=0.2, rotate=45.0):
    h, w = img.shape[:2]
    a = math.radians(rng.uniform(-rotate, rotate))
    s = 1 + rng.uniform(-scale, scale)
    tx, ty = rng.uniform(-shift, shift, 2) * 2
    theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, tx], [math.sin(a) / s, math.cos(a) / s, ty]],
                         dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
    return _warp(img, mask, grid)


def _noise(img, rng):
    std = math.sqrt(rng.uniform(10, 50))
    return (img + rng.normal(0, std, img.shape)).clip(0, 255).astype(np.uint8)


def _blur(img, rng):
    from scipy import ndimage

    kind = rng.integers(3)
    f = img.astype(np.float32)
    if kind == 0:  # motion blur: a line kernel of length 3..7 at a random angle
        n = int(rng.choice([3, 5, 7]))
        k = np.zeros((n, n), np.float32)
        c = n // 2
        a = rng.uniform(0, math.pi)
        for t in np.linspace(-c, c, 4 * n):
            k[int(round(c + t * math.sin(a))), int(round(c + t * math.cos(a)))] = 1
        k /= k.sum()
        out = np.stack([ndimage.convolve(f[..., i], k, mode="reflect") for i in range(3)], -1)
    elif kind == 1:
        out = ndimage.median_filter(f, size=(3, 3, 1))
    else:
        out = ndimage.uniform_filter(f, size=(3, 3, 1))
    return out.clip(0, 255).astype(np.uint8)


def _contrast_group(img, rng):
    from scipy import ndimage

    kind = rng.integers(4)
    f = img.astype(np.float32)
    if kind == 0:  # histogram equalisation (stand-in for CLAHE)
        gray = img.mean(2).astype(np.uint8)
        cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256)).astype(np.float32)
        cdf = (cdf - cdf.min()) / max(cdf.max() - cdf.min(), 1) * 255
        out = f * (cdf[gray] / np.maximum(gray, 1))[..., None]
    elif kind == 1:  # sharpen
        blur = ndimage.uniform_filter(f, size=(3, 3, 1))
        out = f + rng.uniform(0.2, 0.5) * 4 * (f - blur)
    elif kind == 2:  # emboss
        k = np.array([[-1, -1, 0], [-1, 0, 1], [0, 1, 1]], np.float32)
        emb = np.stack([ndimage.convolve(f[..., i], k, mode="reflect") for i in range(3)], -1)
        alpha = rng.uniform(0.2, 0.5)
        out = (1 - alpha) * f + alpha * (emb + 128)
    else:  # brightness and contrast ±0.2
        out = f * (1 + rng.uniform(-0.2, 0.2)) + rng.uniform(-0.2, 0.2) * 255
    return out.clip(0, 255).astype(np.uint8)


def _hsv_shift(img, rng, hue=20, sat=30, val=20):
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue, hue + 1))) % 256
    hsv[..., 1] = (hsv[..., 1] + int(rng.integers(-sat, sat + 1))).clip(0, 255)
    hsv[..., 2] = (hsv[..., 2] + int(rng.integers(-val, val + 1))).clip(0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _rot90(img, mask, rng):
    k = int(rng.integers(4))
    return np.rot90(img, k), np.rot90(mask, k)


def _flip(img, mask, rng):
    axes = [(0,), (1,), (0, 1)][int(rng.integers(3))]
    return np.flip(img, axes), np.flip(mask, axes)


def _transpose(img, mask, rng):
    return img.transpose(1, 0, 2), mask.T


def _distortion_group(img, mask, rng):
    return (_optical, _grid_distort, _local_affine)[int(rng.integers(3))](img, mask, rng)


# (name, probability, function(img, mask, rng) -> (img, mask)): the ten groups of BGAD's code
RANDAUGMENT_OPS = (
    ("rotate90", 0.5, _rot90),
    ("flip", 0.5, _flip),
    ("transpose", 0.5, _transpose),
    ("optical_distortion", 1.0, _optical),
    ("noise", 0.2, lambda i, m, r: (_noise(i, r), m)),
    ("blur", 0.2, lambda i, m, r: (_blur(i, r), m)),
    ("shift_scale_rotate", 0.2, _shift_scale_rotate),
    ("distortion", 0.2, _distortion_group),
    ("contrast", 0.3, lambda i, m, r: (_contrast_group(i, r), m)),
    ("hsv", 0.3, lambda i, m, r: (_hsv_shift(i, r), m)),
)


def randaugment_pair(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, n_ops: int = 3):
    """Apply ``n_ops`` groups drawn without replacement from :data:`RANDAUGMENT_OPS` (each
    with its own probability) to an image and its binary mask together. Square images only
    (90° rotations and transposes keep the size)."""
    img, mask = np.ascontiguousarray(img), (np.asarray(mask) > 0).astype(np.uint8)
    for j in rng.choice(len(RANDAUGMENT_OPS), size=min(n_ops, len(RANDAUGMENT_OPS)), replace=False):
        _, p, fn = RANDAUGMENT_OPS[int(j)]
        if rng.random() < p:
            img, mask = fn(img, mask, rng)
            img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
    return img, mask


def paste_defect(normal: np.ndarray, defect: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 fg: np.ndarray | None = None, inside: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Paste the masked pixels of ``defect`` into a copy of ``normal`` (same size).

    If more than ``inside`` of the defect already lies in the foreground ``fg`` it stays where
    it is; otherwise each connected defect region is moved so its centroid lands on a random
    foreground point at least half the largest region's size away from the borders (BGAD).
    Returns (image, pasted mask as uint8 0/1).
    """
    from scipy import ndimage

    h, w = normal.shape[:2]
    m = np.asarray(mask) > 0
    out = normal.copy()
    if not m.any():
        return out, np.zeros((h, w), np.uint8)
    fg = np.ones((h, w), bool) if fg is None else np.asarray(fg, bool)
    if (m & fg).sum() > inside * m.sum():
        out[m] = defect[m]
        return out, m.astype(np.uint8)
    lab, n = ndimage.label(m)
    boxes = ndimage.find_objects(lab)
    size = max(max(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes)
    margin = size // 2
    allowed = np.zeros((h, w), bool)
    allowed[margin:h - margin, margin:w - margin] = True
    ys, xs = np.nonzero(fg & allowed)
    if len(ys) == 0:
        ys, xs = np.nonzero(allowed) if allowed.any() else np.nonzero(np.ones((h, w), bool))
    new = np.zeros((h, w), bool)
    for r in range(1, n + 1):
        ry, rx = np.nonzero(lab == r)
        k = int(rng.integers(len(ys)))
        dy, dx = int(ys[k] - round(ry.mean())), int(xs[k] - round(rx.mean()))
        ty, tx = ry + dy, rx + dx
        ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        out[ty[ok], tx[ok]] = defect[ry[ok], rx[ok]]
        new[ty[ok], tx[ok]] = True
    return out, new.astype(np.uint8)


def random_box_mask(h: int, w: int, rng: np.random.Generator, area=(0.02, 0.15)) -> np.ndarray:
    """A random rectangle (uint8 0/1 mask) with DRA's CutMix area and aspect-ratio law."""
    pw, ph = _patch_box(rng, h, w, area=area)
    x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
    m = np.zeros((h, w), np.uint8)
    m[y:y + ph, x:x + pw] = 1
    return m


# --------------------------------------------------------------------------------------
# AHL's offline pseudo-anomaly generators (METHODS.md §0.6): CutPaste (G2) and the
# DRAEM-style Perlin-mask texture blend (G4). DTD cannot be downloaded, so G4 blends
# procedurally generated textures (fractal Perlin noise and turbulent bands in random
# colours) instead of DTD photographs.
# --------------------------------------------------------------------------------------
def cutpaste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AHL's "CutPaste" (G2): the same algorithm and parameters as DRA's CutMix (G1)."""
    return cutmix(img, rng)


def _quintic(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)  # 6t^5 - 15t^4 + 10t^3


def perlin_noise(h: int, w: int, res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise (h, w) on a lattice of ``res`` = (rows, cols) cells, roughly in [-1, 1].

    Random unit gradients at the lattice points, quintic fade (DRAEM's generator); any
    image size works (cells need not divide it).
    """
    ry, rx = int(res[0]), int(res[1])
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    yi, xi = y.astype(np.int64), x.astype(np.int64)
    yf, xf = y - yi, x - xi
    ang = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    gy, gx = np.cos(ang), np.sin(ang)

    def corner(oy: int, ox: int) -> np.ndarray:
        r, c = (yi + oy)[:, None], (xi + ox)[None, :]
        return gy[r, c] * (yf - oy)[:, None] + gx[r, c] * (xf - ox)[None, :]

    u, v = _quintic(yf)[:, None], _quintic(xf)[None, :]
    n0 = corner(0, 0) * (1 - u) + corner(1, 0) * u
    n1 = corner(0, 1) * (1 - u) + corner(1, 1) * u
    return (math.sqrt(2) * (n0 * (1 - v) + n1 * v)).astype(np.float32)


def _rotate_float(a: np.ndarray, deg: float) -> np.ndarray:
    """Rotate a float map about its centre (bilinear, empty corners 0)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F").rotate(
        deg, resample=Image.BILINEAR, fillcolor=0.0))


def perlin_mask(h: int, w: int, rng: np.random.Generator, max_log2_res: int = 5, threshold: float = 0.5,
                max_tries: int = 10) -> np.ndarray:
    """DRAEM's anomaly mask (G4 step 4): Perlin noise with 2^a x 2^b cells, a, b uniform in
    0..``max_log2_res``, rotated by U(-90°, 90°), binarised at ``threshold`` -> bool (h, w).

    An empty mask would label an unchanged image as an anomaly, so the noise is redrawn
    (up to ``max_tries`` times, then its top 5 % is taken).
    """
    for _ in range(max_tries):
        a, b = rng.integers(0, max_log2_res + 1, 2)
        noise = _rotate_float(perlin_noise(h, w, (2 ** int(a), 2 ** int(b)), rng), rng.uniform(-90, 90))
        mask = noise > threshold
        if mask.any():
            return mask
    return noise >= np.quantile(noise, 0.95)


def procedural_texture(h: int, w: int, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    """A stand-in for a DTD texture photograph: uint8 (h, w, 3).

    Either fractal Perlin noise (blotchy, stained, porous looks) or turbulent bands
    (banded, veined, striped looks), mapped between two random colours with a little
    independent noise per channel.
    """
    base = int(rng.integers(1, 4))
    fbm = np.zeros((h, w), np.float32)
    for o in range(octaves):
        cells = min(2 ** (base + o), max(1, min(h, w) // 2))
        fbm += 0.5 ** o * perlin_noise(h, w, (cells, cells), rng)
    if rng.random() < 0.5:  # turbulent bands
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        freq = rng.uniform(4, 24)
        field = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + rng.uniform(2, 8) * np.abs(fbm))
    else:
        field = fbm
    t = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    tex = c0 + (c1 - c0) * t[..., None]
    tex += 0.25 * 255 * np.stack([perlin_noise(h, w, (min(h, 32), min(w, 32)), rng) for _ in range(3)], -1) * \
        rng.uniform(0, 1)
    return tex.clip(0, 255).astype(np.uint8)


def _gamma_contrast(im: Image.Image, rng) -> Image.Image:
    a = np.asarray(im, np.float32) / 255
    return Image.fromarray((255 * a ** rng.uniform(0.5, 2.0, 3)).clip(0, 255).astype(np.uint8))


def _multiply_add_brightness(im: Image.Image, rng) -> Image.Image:
    a = np.asarray(im, np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _hue_saturation(im: Image.Image, rng) -> Image.Image:
    hsv = np.asarray(im.convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = (hsv[..., 1] + int(rng.integers(-50, 51))).clip(0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def _solarize(im: Image.Image, rng) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.solarize(im, int(rng.integers(32, 129))) if rng.random() < 0.5 else im


def _texture_ops():
    from PIL import ImageEnhance, ImageOps

    return (
        _gamma_contrast,
        _multiply_add_brightness,
        lambda im, rng: ImageEnhance.Sharpness(im).enhance(rng.uniform(0.0, 2.0)),
        _hue_saturation,
        _solarize,
        lambda im, rng: ImageOps.posterize(im, int(rng.integers(1, 9))),
        lambda im, rng: ImageOps.invert(im),
        lambda im, rng: ImageOps.autocontrast(im),
        lambda im, rng: ImageOps.equalize(im),
        lambda im, rng: im.rotate(rng.uniform(-45, 45), resample=Image.BILINEAR),
    )


def augment_texture(tex: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """DRAEM's texture augmentation (G4 step 3): ``n_ops`` distinct operations drawn from
    gamma contrast, brightness multiply/add, sharpness, hue/saturation shift, solarize,
    posterize, invert, autocontrast, equalize and rotation, applied in sequence."""
    ops = _texture_ops()
    im = Image.fromarray(np.ascontiguousarray(tex))
    for j in rng.choice(len(ops), size=min(n_ops, len(ops)), replace=False):
        im = ops[int(j)](im, rng)
    return np.asarray(im.convert("RGB"))


def draem_pseudo(img: np.ndarray, rng: np.random.Generator, texture: np.ndarray, beta_max: float = 0.8,
                 rotate_prob: float = 0.0) -> np.ndarray:
    """DRAEM-style pseudo anomaly (G4): blend an augmented texture into the image inside a
    Perlin mask P, ``x·(1-P) + (1-β)·texture·P + β·x·P`` with β ~ U(0, ``beta_max``).

    RGB in, RGB out (uint8), so it goes through the same normalisation as every other
    image (the official code feeds BGR without normalisation). ``rotate_prob``: chance of
    first rotating the image by U(-90°, 90°), as DRAEM's loader does (off by default).
    """
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255
    if rotate_prob > 0 and rng.random() < rotate_prob:
        x = np.asarray(Image.fromarray(np.ascontiguousarray(img)).rotate(rng.uniform(-90, 90)), np.float32) / 255
    tex = texture
    if tex.shape[:2] != (h, w):
        tex = np.asarray(Image.fromarray(tex).resize((w, h), Image.BILINEAR))
    tex = augment_texture(tex, rng).astype(np.float32) / 255
    p = perlin_mask(h, w, rng)[..., None].astype(np.float32)
    beta = rng.uniform(0, beta_max)
    out = x * (1 - p) + (1 - beta) * tex * p + beta * x * p
    return (out * 255).round().clip(0, 255).astype(np.uint8)

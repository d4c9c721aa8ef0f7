"""Compact storage of anomaly maps and embeddings.

A map is quantised to 8 bits over ``[vmin, vmax]`` and stored as a grayscale PNG
(a 256x256 map takes a few kB instead of 256 kB as float32). Decoding is exact to half
a quantisation step, well below what a colour map can show. Embeddings are kept as
little-endian float16, enough for t-SNE and nearest-neighbour views.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

_F16 = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)


def as_map(arr: np.ndarray) -> np.ndarray:
    """A float64 ``HxW`` view of a map given as ``HxW``, ``1xHxW`` or ``1x1xHxW``."""
    a = np.asarray(arr, dtype=np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {np.shape(arr)}")
    return a


def encode_map(
    arr: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> tuple[bytes, float, float]:
    """Encode an ``HxW`` float map as an 8-bit PNG.

    ``vmin``/``vmax`` default to the map's own finite min/max; pass a shared range to
    make maps of one run comparable. Values outside the range are clipped and
    non-finite values are stored as ``vmin``. A constant map is stored as zeros with
    ``vmin == vmax``. Returns ``(png_bytes, vmin, vmax)``.
    """
    a = as_map(arr)
    finite = np.isfinite(a)
    if vmin is None:
        vmin = float(a[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(a[finite].max()) if finite.any() else float(vmin)
    vmin, vmax = float(vmin), float(vmax)
    if vmax < vmin:
        raise ValueError(f"vmax ({vmax}) is below vmin ({vmin})")
    span = vmax - vmin
    if span > 0:
        q = np.rint((np.where(finite, a, vmin) - vmin) * (255.0 / span))
        q = np.clip(q, 0, 255).astype(np.uint8)
    else:
        q = np.zeros(a.shape, dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(q).save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), vmin, vmax


def decode_map(png: bytes, vmin: float, vmax: float) -> np.ndarray:
    """Inverse of :func:`encode_map`; returns a float32 ``HxW`` array."""
    with PILImage.open(io.BytesIO(png)) as img:
        q = np.asarray(img.convert("L"), dtype=np.float32)
    return (q * np.float32((vmax - vmin) / 255.0) + np.float32(vmin)).astype(np.float32)


def encode_vector(vec: np.ndarray) -> bytes:
    """Flatten to little-endian float16 bytes (values clipped to the float16 range)."""
    v = np.asarray(vec, dtype=np.float32).ravel()
    v = np.clip(np.nan_to_num(v, nan=0.0), -_F16_MAX, _F16_MAX)
    return v.astype(_F16).tobytes()


def decode_vector(data: bytes, dim: int) -> np.ndarray:
    """Inverse of :func:`encode_vector`; returns a float32 array of length ``dim``."""
    if len(data) != 2 * dim:
        raise ValueError(f"embedding has {len(data)} bytes, expected {2 * dim} for dim={dim}")
    return np.frombuffer(data, dtype=_F16, count=dim).astype(np.float32)

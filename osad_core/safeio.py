"""The guarded reader: every image, zip and server folder that comes from outside passes here.

Images: a file-size limit and a pixel limit of our own, both checked from the file's
header *before* anything is decoded; only allow-listed formats are decoded (by content,
whatever the extension says: a JPEG named ``.png`` is read as the JPEG it is, a text file
named ``.png`` is refused); every mode the pipeline may meet (CMYK, 16-bit, palette,
alpha, animated first frame) becomes RGB. Whatever goes wrong in a decoder becomes an
:class:`~osad_core.errors.ImageRefused` with one sentence, so a caller can report the
file and skip it.

Zips: member count, per-member size, total size and compression ratio are limited while
streaming (bytes are counted, the header's sizes are not trusted); unsafe member names
and links are skipped.

Folders: a server folder is imported only from below configured roots, never from a
hidden folder, and no file may lead out of its root through a link.

Limits come from the environment so an operator can change them:
``OSAD_MAX_PIXELS`` (default 40 Mpx), ``OSAD_MAX_FILE_MB`` (per image or zip member,
default 256), ``OSAD_MAX_ZIP_MEMBERS`` (default 20,000), ``OSAD_MAX_ZIP_TOTAL_MB``
(default 4,096), ``OSAD_MAX_ZIP_RATIO`` (default 200).
"""
from __future__ import annotations

import os
import stat
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import DataError, ImageRefused

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
# decoders tried: those Pillow registers for our extensions; the decoded format must be
# one of them or MPO (the multi-picture JPEG many cameras write, opened by the JPEG decoder)
OPEN_FORMATS = tuple(sorted({Image.registered_extensions()[e] for e in IMAGE_EXTENSIONS
                             if e in Image.registered_extensions()}))
ALLOWED_FORMATS = OPEN_FORMATS + ("MPO",)
# images above this size are decoded reduced (JPEG draft) when a caller needs fewer pixels;
# smaller ones are decoded in full so training inputs stay exactly as they were
LARGE_PIXELS = 4_000_000


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(float(os.environ.get(name, default))))
    except ValueError:
        return default


def max_pixels() -> int:
    return _env_int("OSAD_MAX_PIXELS", 40_000_000)


def max_file_bytes() -> int:
    return _env_int("OSAD_MAX_FILE_MB", 256) << 20


def _mb(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MB"


# --- images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _name(path, name: str | None) -> str:
    """How a message names the file: the caller's name for it, else the file's own name
    (never the server path of an upload); bytes that are not UTF-8 become U+FFFD."""
    if name:
        return name
    return os.fsencode(Path(path).name).decode("utf-8", "replace")


@contextmanager
def open_image(path: str | Path, name: str | None = None) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image after the size, format and pixel checks."""
    shown = _name(path, name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageRefused(f"`{shown}` does not exist") from None
    except OSError:
        raise ImageRefused(f"`{shown}` cannot be read") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageRefused(f"`{shown}` is not a file")
    if st.st_size == 0:
        raise ImageRefused(f"`{shown}` is empty (0 bytes)")
    if st.st_size > max_file_bytes():
        raise ImageRefused(f"`{shown}` is larger than the {_mb(max_file_bytes())} allowed for an image")
    try:
        im = Image.open(path, formats=OPEN_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRefused(f"`{shown}` declares more than the {max_pixels():,} pixels allowed") from None
    except Exception:  # noqa: BLE001 - any decoder failure on hostile bytes is a refusal
        raise ImageRefused(f"`{shown}` is not a readable image: its content is none of the accepted formats "
                           f"({', '.join(OPEN_FORMATS)})") from None
    try:
        w, h = im.size
        if im.format not in ALLOWED_FORMATS:
            raise ImageRefused(f"`{shown}` is a {im.format} file, not an accepted image format")
        if w <= 0 or h <= 0:
            raise ImageRefused(f"`{shown}` declares no pixels")
        if w * h > max_pixels():
            raise ImageRefused(f"`{shown}` is {w:,} × {h:,} pixels, more than the {max_pixels():,} allowed")
        yield im
    finally:
        im.close()


def probe(path: str | Path, name: str | None = None) -> ImageInfo:
    """Format and size from the header, with every check but decoding."""
    with open_image(path, name) as im:
        return ImageInfo(im.format, *im.size)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: scaled to 8 bits by their own maximum
        arr = np.asarray(im, dtype=np.float32)
        hi = max(float(arr.max()), 1.0)
        return Image.fromarray((arr.clip(0, None) / hi * 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's advice for palette transparency; alpha is dropped next
    return im.convert("RGB")


def read_image(path: str | Path, reduce_to: int | None = None, reduce_above: int = 0,
               name: str | None = None) -> Image.Image:
    """Decode to RGB with every check of :func:`open_image`.

    ``reduce_to``: the caller needs only about this many pixels per side, so a JPEG with
    more than ``reduce_above`` pixels is decoded at a reduced scale (never below
    ``reduce_to``). Animated files give their first frame.
    """
    shown = _name(path, name)
    with open_image(path, name) as im:
        try:
            if reduce_to and im.format in ("JPEG", "MPO") and im.width * im.height > reduce_above:
                im.draft("RGB", (reduce_to, reduce_to))
            im.load()
            return _to_rgb(im)
        except MemoryError:
            raise ImageRefused(f"`{shown}` needs more memory to decode than there is") from None
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt or exotic: refuse, never crash
            why = "it is truncated" if "truncated" in str(exc) else f"it does not decode ({exc.__class__.__name__})"
            raise ImageRefused(f"`{shown}` is not a readable image: {why}") from None


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """A ground-truth mask as a 0/1 array of ``size`` × ``size`` (same checks as images)."""
    with open_image(path) as im:
        try:
            m = im.convert("L").resize((size, size), Image.NEAREST)
        except Exception as exc:  # noqa: BLE001
            raise ImageRefused(f"`{_name(path, None)}` is not a readable mask ({exc.__class__.__name__})") from None
    return (np.asarray(m) > 127).astype(np.uint8)


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def utf8_name(path: Path) -> bool:
    """False for a file name whose bytes are not UTF-8 (it could not be stored or shown)."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --- server folders -----------------------------------------------------------------------


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def inside(path: Path, root: Path) -> bool:
    """``path`` (links resolved) lies in ``root`` (resolved) and below no hidden folder there."""
    try:
        rel = path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return False
    return not _hidden(rel.parts)


def confined_folder(path: str, roots: Sequence[str | Path]) -> tuple[Path, Path]:
    """(folder, its root) for a server folder that may be imported, links resolved.

    Every refusal has the same message, whether the path does not exist, is outside the
    roots, is hidden or is not a folder, so the answer tells nobody which paths exist.
    """
    refusal = DataError(f"`{path}` cannot be imported: only folders below the server's import folders "
                        "(OSAD_IMPORT_ROOTS), and none hidden, can be")
    try:
        folder = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        raise refusal from None
    for r in roots:
        try:
            root = Path(r).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if (folder == root or root in folder.parents) and inside(folder, root) and folder.is_dir():
            return folder, root
    raise refusal


# --- zips ---------------------------------------------------------------------------------


@dataclass
class ZipLimits:
    members: int = field(default_factory=lambda: _env_int("OSAD_MAX_ZIP_MEMBERS", 20_000))
    member_bytes: int = field(default_factory=max_file_bytes)
    total_bytes: int = field(default_factory=lambda: _env_int("OSAD_MAX_ZIP_TOTAL_MB", 4096) << 20)
    ratio: int = field(default_factory=lambda: _env_int("OSAD_MAX_ZIP_RATIO", 200))


CHUNK = 1 << 20
# below this many bytes out, a high ratio is no threat (a blank BMP compresses 1000:1)
RATIO_FROM_BYTES = 8 << 20


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a path leading out of the archive (`..`)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a link"
    if info.flag_bits & 0x1:
        return "encrypted"
    return None


def extract_zip(source, zip_name: str, dest_of) -> tuple[list[str], list[str]]:
    """Stream the members of a zip to files, with limits; returns (written, skipped notes).

    ``source``: path or binary file object. ``dest_of(member_name)``: the file to write,
    or ``None`` to leave the member out. Unsafe members (absolute, ``..``, links,
    encrypted) are skipped with a note. A zip over a limit is refused whole
    (:class:`DataError`); the files written so far are then the caller's to remove.
    """
    lim = ZipLimits()
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise DataError(f"`{zip_name}` is not a readable zip file") from None
    written: list[str] = []
    skipped: list[str] = []
    total = 0
    with zf:
        infos = zf.infolist()
        if len(infos) > lim.members:
            raise DataError(f"`{zip_name}` holds {len(infos):,} entries, more than the {lim.members:,} allowed")
        for info in infos:
            if info.is_dir():
                continue
            why = _unsafe_member(info)
            if why:
                skipped.append(f"`{info.filename}` ({why})")
                continue
            dest = dest_of(info.filename)
            if dest is None:
                continue
            dest = Path(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            try:
                with zf.open(info) as src, open(dest, "wb") as out:
                    written.append(str(dest))
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        total += len(chunk)
                        if n > lim.member_bytes:
                            raise DataError(f"`{zip_name}` holds `{info.filename}`, which expands beyond the "
                                            f"{_mb(lim.member_bytes)} allowed for one file")
                        if total > lim.total_bytes:
                            raise DataError(f"`{zip_name}` expands beyond the {_mb(lim.total_bytes)} allowed")
                        if n > RATIO_FROM_BYTES and n > lim.ratio * max(info.compress_size, 1):
                            raise DataError(f"`{zip_name}` holds `{info.filename}`, compressed more than "
                                            f"{lim.ratio}:1 (a zip bomb?)")
                        out.write(chunk)
            except DataError:
                raise
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, ValueError) as exc:
                dest.unlink(missing_ok=True)
                written.remove(str(dest))
                skipped.append(f"`{info.filename}` (damaged in the zip: {exc.__class__.__name__})")
    return written, skipped

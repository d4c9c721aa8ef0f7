"""Model files that cannot run code: tensors in safetensors, everything else in a JSON manifest.

On disk a model is ONE safetensors file (extension ``.osad``): the tensors, plus the
manifest as a JSON string under the key ``osad_manifest`` of the header's ``__metadata__``
(safetensors metadata values are strings). One file because a line PC must be able to
score with the single file an inspector downloads; a safetensors file rather than a zip
of two parts because then one well-kept parser covers the whole file (no archive members,
names or compression to guard) and any safetensors tool can list it.

The manifest holds the method, preset, config, backbone info (with its weights source),
training history, format version, creation time and the detector's state as JSON in
which each tensor or numpy array is a placeholder (``{"$tensor": key}``,
``{"$ndarray": key}``; tuples are ``{"$tuple": [...]}``) naming its entry in the
safetensors part under a dotted key. ``payload_sha256`` covers the tensor table and the
tensor bytes and is checked before anything in the file is used; the manifest, which
cannot carry its own hash, is checked field by field. Nothing is unpickled:
old PyTorch ``.pt`` model files are read only with ``torch.load(weights_only=True)``
(PyTorch >= 2.6, whose restricted unpickler builds tensors, numpy arrays and plain values
only) and pass through the same validation as new files.

Saving is atomic: a temporary file in the target folder, fsync, then ``os.replace``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

EXTENSION = ".osad"
FORMAT = "osad-model"
FORMAT_VERSION = 2  # 1 = the pickled .pt files of earlier versions
MANIFEST_KEY = "osad_manifest"
MAX_MODEL_BYTES = 1 << 30  # paper-preset Wide-ResNet-50 models are ~0.3 GB
MAX_HEADER_BYTES = 16 << 20  # tensor table + manifest; real ones are well under 1 MB
_REQUIRED = {"format": str, "format_version": int, "method": str, "preset": str, "config": dict,
             "history": list, "state": dict, "payload_sha256": str}


class ModelFileError(ValueError):
    """A model file that is refused; the message is one sentence for the user."""


# --------------------------------------------------------------------------------------
# state <-> (JSON, tensors)
# --------------------------------------------------------------------------------------
def encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """JSON-able form of ``obj``; tensors and arrays go into ``tensors`` under dotted keys.

    Anything else (a module, a function, an object array, ...) raises TypeError here, at
    save time, so a method cannot silently ship something that needs code to load."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if key in tensors:
            raise TypeError(f"two values of the model state map to the same key {key!r}")
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biuf":
                raise TypeError(f"cannot store the {obj.dtype} array at {key!r} in a model file")
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
            return {"$ndarray": key}
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.generic):  # numpy scalars in histories and configs
        return encode(obj.item(), key, tensors)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise TypeError(f"cannot store the key {k!r} at {key!r} in a model file (keys are strings "
                                "not starting with '$')")
            out[k] = encode(v, f"{key}.{k}", tensors)
        return out
    raise TypeError(f"cannot store a {type(obj).__name__} at {key!r} in a model file: only tensors, numpy "
                    "arrays and JSON values (numbers, strings, lists, dicts) are allowed")


def decode(obj, tensors: dict[str, torch.Tensor], used: set[str]):
    """The inverse of ``encode``; a placeholder naming no stored tensor raises ModelFileError."""
    if isinstance(obj, list):
        return [decode(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (k, v), = obj.items()
        if k == "$tuple" and isinstance(v, list):
            return tuple(decode(x, tensors, used) for x in v)
        if k in ("$tensor", "$ndarray"):
            if not isinstance(v, str) or v not in tensors:
                raise ModelFileError(f"its manifest names a tensor {str(v)[:80]!r} that the file does not hold")
            used.add(v)
            return tensors[v].numpy() if k == "$ndarray" else tensors[v]
    return {k: decode(v, tensors, used) for k, v in obj.items()}


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _split_header(data: bytes) -> tuple[dict, bytes] | None:
    """(header JSON, tensor bytes) of a safetensors buffer, or None when it is not one."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        return None
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return (header, data[8 + n:]) if isinstance(header, dict) else None


def _payload_sha256(header: dict, payload: bytes) -> str:
    """sha256 of the tensor table (names, dtypes, shapes, offsets) and the tensor bytes."""
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    h.update(payload)
    return h.hexdigest()


def to_bytes(fields: dict) -> bytes:
    """One model file's bytes from method, preset, config, backbone_info, history, state."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    manifest = {k: encode(v, k, tensors) for k, v in fields.items()}
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _unshare(tensors)
    # The tensor bytes do not depend on the metadata, so hash a first serialisation, then
    # write the manifest with that hash (and check that the tensor table indeed did not move).
    header, payload = _split_header(save(tensors))
    manifest["payload_sha256"] = _payload_sha256(header, payload)
    data = save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})
    again, _ = _split_header(data)
    assert {k: v for k, v in again.items() if k != "__metadata__"} == header
    return data


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """Copy the tensors that share storage with another (tied weights, views): safetensors refuses those."""
    seen: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            tensors[k] = t.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a part.

    The temp name is the one :func:`osad_core.artefacts.atomic_path` gives, so the worker's
    start-up sweep recognises (and removes) what a killed writer left behind."""
    from .artefacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        # 0644: readable by the other users of a shared data folder
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
            f.write(data)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def read_model(path: str | Path, max_bytes: int = MAX_MODEL_BYTES) -> dict:
    """The checked manifest of a model file with its ``state`` decoded (tensors, arrays).

    Raises FileNotFoundError for a missing file and ModelFileError for anything refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelFileError(f"model file {path} has {size:,} bytes, more than the {max_bytes:,} a model file "
                             "may have")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # read once: what is checked is what is loaded
    split = _split_header(data)
    if split is None and (data[:4] == b"PK\x03\x04" or data[:2] == b"\x80\x02"):  # torch.save: zip or pickle
        return _read_legacy(path, data)
    meta = split[0].get("__metadata__") if split else None
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ModelFileError(f"{path} is not an OSAD Studio model file")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except (TypeError, ValueError, RecursionError):
        raise ModelFileError(f"the manifest of model file {path} is not valid JSON") from None
    _check_fields(path, manifest)
    if _payload_sha256(*split) != manifest["payload_sha256"]:
        raise ModelFileError(f"the tensors in model file {path} do not match the hash in its manifest "
                             "(the file is damaged or was altered)")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"model file {path} holds unreadable tensors ({exc})") from None
    return _decoded(path, manifest, tensors)


def _check_fields(path: Path, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an OSAD Studio model file")
    if isinstance(manifest.get("format_version"), int) and manifest["format_version"] > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer OSAD Studio (format {manifest['format_version']}); "
                             "update OSAD Studio to load it")
    for key, typ in _REQUIRED.items():
        if not isinstance(manifest.get(key), typ):
            raise ModelFileError(f"the manifest of model file {path} lacks a valid {key!r}")
    if not isinstance(manifest.get("backbone_info"), (dict, type(None))):
        raise ModelFileError(f"the manifest of model file {path} lacks a valid 'backbone_info'")


def _decoded(path: Path, manifest: dict, tensors: dict) -> dict:
    used: set[str] = set()
    try:
        out = {k: decode(v, tensors, used) for k, v in manifest.items()}
    except ModelFileError as exc:
        raise ModelFileError(f"model file {path} is malformed: {exc}") from None
    except RecursionError:
        raise ModelFileError(f"model file {path} is malformed: its manifest is nested too deeply") from None
    if set(tensors) - used:
        raise ModelFileError(f"model file {path} is malformed: it holds tensors its manifest does not name")
    return out


def _legacy_allowed_globals() -> list:
    """What old model files may contain besides tensors and plain values: numpy arrays."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype] + [type(np.dtype(c)) for c in "?bBhHiIlLqQefd"]


def _read_legacy(path: Path, data: bytes) -> dict:
    """An old pickled .pt model, read only through PyTorch's restricted unpickler."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):  # older weights_only unpicklers had code-execution holes
        raise ModelFileError(f"{path} is an old-format (.pt) model file, which OSAD Studio opens only with PyTorch "
                             f"2.6 or newer (this is {torch.__version__}); upgrade PyTorch and run `python -m "
                             f"osad_core export --model {path.name} --out {path.stem}.osad`, or re-train the model")
    try:
        with torch.serialization.safe_globals(_legacy_allowed_globals()):
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any refusal by the restricted unpickler, or a damaged file
        raise ModelFileError(f"{path} is an old-format (.pt) model file that is damaged or holds more than tensors "
                             "and plain values, so OSAD Studio will not open it; re-train the model (it is then "
                             "saved as .osad)") from None
    if not isinstance(blob, dict) or "method" not in blob:
        raise ModelFileError(f"{path} is not an OSAD Studio model file")
    # the same validation as a new file: only tensors, arrays and JSON values survive
    tensors: dict[str, torch.Tensor] = {}
    try:
        fields = {k: encode(blob.get(k), k, tensors)
                  for k in ("method", "preset", "config", "backbone_info", "history", "state")}
    except TypeError as exc:
        raise ModelFileError(f"{path} is an old-format (.pt) model file with unexpected content ({exc})") from None
    fields.update(format=FORMAT, format_version=blob.get("format_version", 1), payload_sha256="")
    _check_fields(path, fields)
    return _decoded(path, fields, tensors)

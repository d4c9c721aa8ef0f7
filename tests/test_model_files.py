"""Model files: every detector round-trips through one .osad file, hostile files are refused
(by the library and by the CLI, with one line and no traceback), saves are atomic."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from osad_core import modelfile
from osad_core.data import load_folder
from osad_core.methods import load_detector, make_detector
from osad_core.modelfile import ModelFileError
from osad_core.protocol import Protocol, make_split

ROOT = Path(__file__).resolve().parents[1]
R18 = {"weights": "random", "backbone": "resnet18", "image_size": 64, "device": "cpu"}
# the tiny preset, cut to the fewest steps that still fit every part of each state
OVERRIDES = {
    "devnet": dict(R18, epochs=1, steps_per_epoch=1),
    "dra": dict(R18, epochs=1, steps_per_epoch=1),
    "saliencycut": dict(R18, epochs=1, steps_per_epoch=1),
    "ahl": dict(R18, base_overrides={"epochs": 1, "steps_per_epoch": 1}, epochs=2, steps_per_epoch=1),
    "bgad": dict(R18, epochs=1),
    "ckaad": {"backbone": "efficientnet_lite0", "image_size": 64, "device": "cpu", "epochs": 1},
    "fusion": {"backbone": "efficientnet_lite0", "device": "cpu", "head_steps": 2},
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("mf") / "parts", n_train=8, n_test_good=3, n_defect=3)
    return make_split(load_folder(root), Protocol("general", 2, seed=0))


@pytest.fixture(scope="module")
def devnet_file(split, tmp_path_factory):
    """One small valid model file that the hostile variants are made from."""
    det = make_detector("devnet", "tiny", OVERRIDES["devnet"]).fit(split.train_normal, split.train_anomalies)
    return det.save(tmp_path_factory.mktemp("valid") / "devnet.osad")


# --------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(OVERRIDES))
def test_every_method_round_trips_with_identical_outputs(method, split, tmp_path):
    det = make_detector(method, "tiny", OVERRIDES[method]).fit(split.train_normal, split.train_anomalies)
    a = det.predict(split.test)
    path = det.save(tmp_path / f"{method}.osad")
    assert sorted(os.listdir(tmp_path)) == [f"{method}.osad"]  # no temporary file left behind
    back = load_detector(path, device="cpu")
    b = back.predict(split.test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    for k in a.extra:
        np.testing.assert_array_equal(a.extra[k], b.extra[k])
    if method == "ahl":  # ψ's weights are part of the state
        assert back.psi_state is not None and back.psi_state.keys() == det.psi_state.keys()
    assert back.config == dict(det.config, device="cpu") and back.preset == "tiny"
    np.testing.assert_equal(back.backbone_info, det.backbone_info)  # NaN losses compare equal here
    np.testing.assert_equal(back.history, det.history)
    manifest = modelfile.read_model(path)
    assert manifest["format"] == "osad-model" and manifest["format_version"] == modelfile.FORMAT_VERSION
    assert manifest["method"] == method and manifest["created"].endswith("+00:00")
    assert len(manifest["payload_sha256"]) == 64


def test_state_parts_keep_their_types():
    tensors: dict = {}
    w = torch.arange(8.0)
    state = {"t": torch.arange(6.0).view(2, 3)[:, 1:], "a": np.arange(4, dtype=np.uint8), "tied": [w, w, w[2:4]],
             "pairs": [(torch.ones(2), torch.zeros(2))], "n": np.float32(0.5), "s": "x", "none": None,
             "nested": {"layers": (2, 3), "flags": [True, 1, 2.5]}}
    enc = modelfile.encode(state, "state", tensors)
    json.dumps(enc)  # only JSON in the manifest
    assert set(tensors) == {"state.t", "state.a", "state.pairs.0.0", "state.pairs.0.1", "state.tied.0",
                            "state.tied.1", "state.tied.2"}
    modelfile._unshare(tensors)  # safetensors refuses tied weights and views into a larger tensor
    back = modelfile.decode(enc, st_load(st_save(tensors)), set())
    assert torch.equal(back["tied"][1], w) and torch.equal(back["tied"][2], w[2:4])
    assert torch.equal(back["t"], state["t"]) and back["a"].dtype == np.uint8 and isinstance(back["a"], np.ndarray)
    assert isinstance(back["pairs"][0], tuple) and torch.equal(back["pairs"][0][0], torch.ones(2))
    assert back["n"] == 0.5 and type(back["n"]) is float and back["nested"] == state["nested"]


@pytest.mark.parametrize("bad,what", [
    (torch.nn.Linear(2, 2), "Linear"), (lambda: 0, "function"), (np.array([object()]), "object"),
    ({1: torch.ones(1)}, "key 1"), ({"$tensor": "x"}, r"key '\$tensor'"), ({"a": {1, 2}}, "set"),
])
def test_state_that_would_need_code_to_load_is_refused_at_save(bad, what, devnet_file, tmp_path, monkeypatch):
    det = load_detector(devnet_file, device="cpu")
    monkeypatch.setattr(det, "state", lambda: {"model": bad})
    with pytest.raises(TypeError, match=what):
        det.save(tmp_path / "m.osad")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# hostile model files
# --------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs a shell command: what a crafted .pt file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a model file whose manifest string ``change`` rewrote (tensors untouched)."""
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = f.metadata()
    dst.write_bytes(st_save(st_load(src.read_bytes()), metadata={"osad_manifest": change(meta["osad_manifest"])}))
    return dst


def _manifest_edit(**fields):
    def change(text):
        m = json.loads(text)
        m.update(fields)
        return json.dumps(m)
    return change


def _hostile(kind: str, src: Path, d: Path) -> Path:
    p = d / f"{kind}.osad"
    data = src.read_bytes()
    if kind == "pickle_pt":  # torch.save's zip layout with a code-running object inside
        p = d / "evil.pt"
        torch.save({"method": "devnet", "state": _RunsCode(d / "MARKER")}, p)
    elif kind == "pickle_bare":  # a bare pickle stream, as the pre-zip torch.save wrote
        p = d / "evil_bare.pt"
        p.write_bytes(pickle.dumps(_RunsCode(d / "MARKER"), protocol=2))
    elif kind == "altered_tensor":
        b = bytearray(data)
        b[-100] ^= 0xFF  # one byte inside the last tensor
        p.write_bytes(bytes(b))
    elif kind == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_header":
        p.write_bytes(data[:200])
    elif kind == "unknown_method":
        _rewrite(src, p, _manifest_edit(method="mystery"))
    elif kind == "manifest_not_json":
        _rewrite(src, p, lambda text: text[:-10])
    elif kind == "manifest_lacks_state":
        _rewrite(src, p, lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "state"}))
    elif kind == "manifest_names_missing_tensor":
        _rewrite(src, p, lambda text: text.replace('"state.model.', '"state.gone.', 1))
    elif kind == "wrong_backbone":
        _rewrite(src, p, _manifest_edit(backbone_info={"name": "Evil-Net"}))
    elif kind == "newer_format":
        _rewrite(src, p, _manifest_edit(format_version=99))
    elif kind == "plain_safetensors":  # a valid safetensors file, but not an OSAD Studio model
        p.write_bytes(st_save({"w": torch.ones(3)}))
    elif kind == "zero_bytes":
        p.write_bytes(b"")
    elif kind == "png":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(p, format="PNG")
    elif kind == "huge_header":  # declares a 4 EB header
        p.write_bytes((1 << 62).to_bytes(8, "little") + b'{"__metadata__": {}}')
    elif kind == "too_large":  # sparse: no disk used, but bigger than a model file may be
        with open(p, "wb") as f:
            f.truncate(modelfile.MAX_MODEL_BYTES + 1)
    return p


# kind -> words the one-line refusal must contain
HOSTILE = {
    "pickle_pt": "holds more than tensors and plain values, so OSAD Studio will not open it; re-train",
    "pickle_bare": "holds more than tensors and plain values, so OSAD Studio will not open it; re-train",
    "altered_tensor": "do not match the hash in its manifest",
    "truncated": "do not match the hash in its manifest",
    "truncated_header": "is not an OSAD Studio model file",
    "unknown_method": "'mystery' model, which this version does not know",
    "manifest_not_json": "is not valid JSON",
    "manifest_lacks_state": "lacks a valid 'state'",
    "manifest_names_missing_tensor": "names a tensor",
    "wrong_backbone": "does not fit its method 'devnet'",
    "newer_format": "written by a newer OSAD Studio",
    "plain_safetensors": "is not an OSAD Studio model file",
    "zero_bytes": "is not an OSAD Studio model file",
    "png": "is not an OSAD Studio model file",
    "huge_header": "is not an OSAD Studio model file",
    "too_large": "more than the 1,073,741,824 a model file may have",
}


# Through a real `python -m osad_core score` process: the pickle payloads (a live process
# must not run them, nor print PyTorch's warnings) and one new-format and one foreign file.
# Each process spends ~3 s of CPU importing torch, so the other kinds go through the CLI's
# main() in this process below (same exit code and stderr; a traceback would fail the test).
SUBPROCESS_KINDS = ("pickle_pt", "pickle_bare", "altered_tensor", "png")


@pytest.fixture(scope="module")
def hostile_cli(devnet_file, split, tmp_path_factory):
    """Hostile files through `python -m osad_core score`, the processes run side by side."""
    d = tmp_path_factory.mktemp("hostile")
    images = str(Path(split.test[0].path).parent)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = {}
    for kind in SUBPROCESS_KINDS:
        path = _hostile(kind, devnet_file, d)
        procs[kind] = subprocess.Popen([sys.executable, "-m", "osad_core", "score", "--model", str(path), images],
                                       cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {k: (p.wait(timeout=300), p.stderr.read()) for k, p in procs.items()}
    out["marker_created"] = (d / "MARKER").exists()
    return out


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_model_file_is_refused_by_the_loader(kind, devnet_file, tmp_path):
    path = _hostile(kind, devnet_file, tmp_path)
    with pytest.raises(ModelFileError, match=HOSTILE[kind].replace("(", r"\(")) as exc:
        load_detector(path, device="cpu")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_model_file_is_one_line_from_the_cli(kind, devnet_file, split, tmp_path, capsys):
    from osad_core.cli import main

    path = _hostile(kind, devnet_file, tmp_path)
    assert main(["score", "--model", str(path), str(Path(split.test[0].path).parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and HOSTILE[kind] in err and err.count("\n") == 1, err
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", SUBPROCESS_KINDS)
def test_hostile_model_file_is_one_line_from_a_cli_process(kind, hostile_cli):
    rc, err = hostile_cli[kind]
    assert rc == 2, err
    assert err.startswith("error: ") and HOSTILE[kind] in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_pickle_payloads_really_run_code_and_are_never_unpickled(hostile_cli, tmp_path):
    # the payload is live: unpickling it the old way creates its marker ...
    probe = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(_RunsCode(probe), protocol=2))
    assert probe.exists()
    # ... yet the CLI processes never created the hostile files' marker (nor did the loader above)
    assert hostile_cli["marker_created"] is False


# --------------------------------------------------------------------------------------
# old .pt files and export
# --------------------------------------------------------------------------------------
def test_old_pt_model_loads_through_weights_only_and_exports(split, tmp_path, capsys):
    from osad_core.cli import main

    det = make_detector("dra", "tiny", OVERRIDES["dra"]).fit(split.train_normal, split.train_anomalies)
    old = tmp_path / "dra.pt"
    torch.save({"format_version": 1, "method": det.name, "preset": det.preset, "config": det.config,  # the old layout
                "backbone_info": det.backbone_info, "history": det.history, "state": det.state()}, old)
    a = det.predict(split.test).scores
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):
        with pytest.raises(ModelFileError, match="opens only with PyTorch 2.6 or newer"):
            load_detector(old)
        return
    np.testing.assert_array_equal(load_detector(old, device="cpu").predict(split.test).scores, a)
    assert main(["export", "--model", str(old), "--out", str(tmp_path / "dra.osad")]) == 0
    assert "saved to" in capsys.readouterr().out
    np.testing.assert_array_equal(load_detector(tmp_path / "dra.osad", device="cpu").predict(split.test).scores, a)
    assert main(["export", "--model", str(old), "--out", str(tmp_path / "dra.pt2")]) == 2
    assert "--out must end in .osad" in capsys.readouterr().err


def test_old_pt_model_is_refused_under_a_pytorch_older_than_2_6(tmp_path, monkeypatch):
    old = tmp_path / "m.pt"
    torch.save({"method": "devnet", "state": {}}, old)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")  # its weights_only unpickler had holes
    with pytest.raises(ModelFileError, match=r"opens only with PyTorch 2.6 or newer \(this is 2.5.1\+cpu\); upgrade "
                                             r"PyTorch and run `python -m osad_core export --model m.pt --out m.osad`"):
        load_detector(old)


# --------------------------------------------------------------------------------------
# atomic save
# --------------------------------------------------------------------------------------
class _DiskFullHalfway:
    """A file object that writes half of what it is given, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        self.written = self.f.write(bytes(data[: len(data) // 2]))
        self.f.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_interrupted_save_leaves_no_file_and_no_temp_file(devnet_file, tmp_path, monkeypatch):
    det = load_detector(devnet_file, device="cpu")
    real_fdopen, seen = os.fdopen, []

    def fdopen(fd, *a, **k):
        seen.append(_DiskFullHalfway(real_fdopen(fd, *a, **k)))
        return seen[-1]

    target = tmp_path / "models" / "run_1.osad"
    monkeypatch.setattr(modelfile.os, "fdopen", fdopen)
    with pytest.raises(OSError, match="No space left"):
        det.save(target)
    assert seen and seen[0].written > 1000  # it really stopped half-way through the bytes
    assert os.listdir(target.parent) == []

    # over an existing model, a failed save keeps the old file whole
    monkeypatch.undo()
    det.save(target)
    before = target.read_bytes()
    monkeypatch.setattr(modelfile.os, "fdopen", fdopen)
    with pytest.raises(OSError):
        det.save(target)
    assert os.listdir(target.parent) == ["run_1.osad"] and target.read_bytes() == before
    monkeypatch.undo()
    load_detector(target, device="cpu")


def test_cli_train_refuses_a_model_name_that_is_not_osad_before_training(tmp_path, capsys):
    from osad_core.cli import main

    assert main(["train", "--data", "/no/such/folder", "--out", str(tmp_path / "m.pt"), "--no-db"]) == 2
    err = capsys.readouterr().err
    assert "--out must end in .osad" in err and err.count("\n") == 1

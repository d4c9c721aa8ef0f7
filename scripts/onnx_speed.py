"""Images/s of ONNX Runtime against PyTorch on this CPU, same model, same images.

    python scripts/onnx_speed.py --methods dra,bgad --images 64 --threads 2

The model is a quick-preset detector fitted for one step (speed does not depend on what
it learned); both paths score the same decoded HeadCT images, decoding not timed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from osad_core.data import IMAGE_CACHE, resolve_dataset  # noqa: E402
from osad_core.export import export_onnx  # noqa: E402
from osad_core.methods import load_detector, make_detector  # noqa: E402
from osad_core.onnx_model import OnnxModel  # noqa: E402
from osad_core.protocol import Protocol, make_split  # noqa: E402


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="dra,bgad")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sp = make_split(resolve_dataset("headct"), Protocol("general", 2, seed=0))
    for method in a.methods.split(","):
        det = make_detector(method, "quick", {"epochs": 1, "steps_per_epoch": 1, "device": "cpu"})
        det.fit(sp.train_normal[:16], sp.train_anomalies)
        with tempfile.TemporaryDirectory() as tmp:
            det = load_detector(det.save(Path(tmp) / "m.pt"), "cpu")
            export_onnx(det, Path(tmp) / "m.onnx")
            onnx = OnnxModel(Path(tmp) / "m.onnx", threads=a.threads)
            arr, _, _ = IMAGE_CACHE.load_many(sp.test[:a.images], det.config["image_size"])
            det.predict_arrays(arr[:2], a.batch)  # warm-up both
            onnx.predict_arrays(arr[:2], a.batch)
            t_torch = best_of(lambda: det.predict_arrays(arr, a.batch))
            t_onnx = best_of(lambda: onnx.predict_arrays(arr, a.batch))
            s_t = det.predict_arrays(arr, a.batch).scores
            s_o, _ = onnx.predict_arrays(arr, a.batch)
        print(f"{method}: {det.config['image_size']} px, backbone {det.backbone_info['name']}, {len(arr)} images, "
              f"batch {a.batch}, {a.threads} threads: PyTorch {len(arr) / t_torch:.1f} img/s, "
              f"ONNX Runtime {len(arr) / t_onnx:.1f} img/s; max relative score difference "
              f"{np.max(np.abs(s_t - s_o) / np.maximum(np.abs(s_t), 1e-6)):.1e}", flush=True)


if __name__ == "__main__":
    main()

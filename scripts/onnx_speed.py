"""Images/s of ONNX Runtime against PyTorch on this CPU, same model, same images.

    python scripts/onnx_speed.py --methods fusion,ckaad --images 64 --threads 1 --json out.json

The model is a quick-preset detector fitted for one step (speed does not depend on what
it learned); both paths score the same decoded HeadCT images, decoding not timed. Also
prints their parity (:func:`osad_core.export.parity`): score differences relative to
max(|score|, the spread of PyTorch's scores on 32 held-out training normals), map
differences relative to max(|value|, the maps' spread).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from osad_core.data import IMAGE_CACHE, resolve_dataset  # noqa: E402
from osad_core.export import export_onnx, parity  # noqa: E402
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
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    torch.set_num_threads(a.threads)
    sp = make_split(resolve_dataset("headct"), Protocol("general", 2, seed=0))
    for method in a.methods.split(","):
        short = {"epochs": 1, "steps_per_epoch": 1, "head_steps": 1, "device": "cpu"}
        known = make_detector(method, "quick", {"device": "cpu"}).config
        det = make_detector(method, "quick", {k: v for k, v in short.items() if k in known})
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
            ref = det.predict_arrays(arr, a.batch)
            s_o, m_o = onnx.predict_arrays(arr, a.batch)
            held_out, _, _ = IMAGE_CACHE.load_many(sp.train_normal[16:48], det.config["image_size"])
            unit = float(np.std(det.predict_arrays(held_out, a.batch).scores))
        row = {"method": method, "image_size": det.config["image_size"], "backbone": det.backbone_info["name"],
               "images": len(arr), "batch": a.batch, "threads": a.threads,
               "torch_img_s": round(len(arr) / t_torch, 2), "onnx_img_s": round(len(arr) / t_onnx, 2),
               **parity(ref.scores, ref.maps, s_o, m_o, unit)}
        rows.append(row)
        print(f"{method}: {row['image_size']} px, backbone {row['backbone']}, {len(arr)} images, "
              f"batch {a.batch}, {a.threads} threads: PyTorch {row['torch_img_s']:.1f} img/s, "
              f"ONNX Runtime {row['onnx_img_s']:.1f} img/s; max relative score difference "
              f"{row['max_rel_score_diff']:.1e} (absolute {row['max_abs_score_diff']:.1e}, held-out normals' "
              f"spread {row['score_unit']:.2g}, |Δ|/|s| {row['max_rel_score_diff_pointwise']:.1e}), max relative "
              f"map difference {row['max_rel_map_diff']:.1e} (absolute {row['max_abs_map_diff']:.1e})", flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

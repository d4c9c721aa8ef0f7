"""Fusion's settings compared on one protocol cell, seed by seed, with its two parts apart.

    OMP_NUM_THREADS=1 python scripts/bench_fusion_variants.py --data headct --shots 10 --seeds 0 1 2 \
        --variant base --variant mem8k:memory_max=8192,pool_max=80000 --json out.json

Every variant is a full Fusion fit (quick preset unless --preset) under the benchmark's
protocol (the same split, 20 % of the normals held out for the operating point and not
used, as ``python -m osad_core benchmark`` does), so its image AUROC is the benchmark's.
What is shared: the frozen backbone's output per image (the extractor is frozen, so a
variant that changes nothing before it sees the same features), which makes a variant cost
its memory, head and scoring only. Train seconds are therefore not reported here; time an
adopted setting with the benchmark command.

Per run it also reports the two parts' own image AUROC (memory alone, head alone) and the
fused AUROC had the z-normalisation used the *test* normals' moments (a diagnostic only:
how much the held-out normals' estimate of each part's scale costs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
import osad_core.methods.fusion as fusion_module
from osad_core.data import IMAGE_CACHE, resolve_dataset
from osad_core.evaluate import evaluate_prediction
from osad_core.methods.base import make_detector
from osad_core.methods.fusion import topk_mean
from osad_core.operating_point import DEFAULT_CALIBRATION_FRACTION, split_calibration
from osad_core.protocol import Protocol, make_split


class CachedExtractor(nn.Module):
    """The frozen extractor with its per-image outputs remembered (keyed by the input's bytes)."""

    def __init__(self, inner: nn.Module, store: dict):
        super().__init__()
        self.inner, self.store = inner, store

    def forward(self, x: torch.Tensor, **kw) -> list[torch.Tensor]:
        # the layout (channels_last) changes no value: the same stored outputs serve either
        keys = [hashlib.blake2b(x[i].cpu().numpy().tobytes(), digest_size=16).digest() for i in range(len(x))]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        if miss:
            out = self.inner(x[miss], **kw)
            for j, i in enumerate(miss):
                self.store[keys[i]] = [o[j].clone() for o in out]
        levels = len(self.store[keys[0]])
        return [torch.stack([self.store[k][lvl] for k in keys]) for lvl in range(levels)]


STORES: dict = {}
_build_multiscale = fusion_module.multiscale_for


def _cached_multiscale_for(config, backbone_info, fresh):
    ext, info = _build_multiscale(config, backbone_info, fresh)
    key = (config["backbone"], tuple(config["layers"]), config["image_size"])
    return CachedExtractor(ext, STORES.setdefault(key, {})), info


fusion_module.multiscale_for = _cached_multiscale_for


def record_recon_trajectory() -> None:
    """Make the reconstruction gate's evidence also hold ``trajectory``: the reconstruction
    part's AUROC of the labelled anomalies against the held-out normals (the gate's own
    measure) after each epoch of its training; the last entry is the evidence itself.
    Scoring between epochs runs without gradients and draws no random numbers, so the
    training it watches is the one without it."""
    import osad_core.methods.ckaad as ckaad_module

    fit_recon, loop = fusion_module.Fusion._fit_recon, ckaad_module.run_loop
    watch: dict = {}

    def watched_fit_recon(self, normal_records, anomaly_records, cal_images, cal_memory, anomalies, callbacks):
        watch.update(det=self, cal=cal_images, anomalies=anomalies, trajectory=[])
        try:
            fit_recon(self, normal_records, anomaly_records, cal_images, cal_memory, anomalies, callbacks)
        finally:
            trajectory = watch.pop("trajectory", [])
            watch.clear()
        if self.recon_evidence and self.recon_evidence.get("reconstruction") is not None:
            self.recon_evidence["trajectory"] = trajectory + [self.recon_evidence["reconstruction"]]

    def watched_loop(step_fn, epochs, steps, callbacks=None, on_epoch_start=None, **kw):
        if not watch or not len(watch["anomalies"]):
            return loop(step_fn, epochs, steps, callbacks, on_epoch_start=on_epoch_start, **kw)
        det = watch["det"]

        def each_epoch(epoch: int) -> None:
            if epoch:
                watch["trajectory"].append(fusion_module._separation(
                    det._recon_parts(watch["anomalies"])[0], det._recon_parts(watch["cal"])[0]))
            if on_epoch_start:
                on_epoch_start(epoch)
        return loop(step_fn, epochs, steps, callbacks, on_epoch_start=each_epoch, **kw)

    fusion_module.Fusion._fit_recon = watched_fit_recon
    ckaad_module.run_loop = watched_loop


@torch.no_grad()
def parts(det, arrays: np.ndarray, bs: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw image scores of the memory (top-k mean of the nearest-patch distances), of the head
    (top-k mean of the members' mean map) and of each head member alone (N, members), as
    Fusion computes them before the z-normalisation."""
    mem, head, members = [], [], []
    for i in range(0, len(arrays), bs):
        f = det._features(arrays[i:i + bs])
        mem.append(topk_mean(det._knn(f), det.config["memory_topk"]).cpu().numpy())
        if det.has_head:
            det.head.eval()
            each = det.head(f, each=True)
            head.append(topk_mean(each.mean(1), det.config["head_topk"]).cpu().numpy())
            members.append(torch.stack([topk_mean(each[:, k], det.config["head_topk"])
                                        for k in range(each.shape[1])], 1).cpu().numpy())
    if not head:
        return np.concatenate(mem), None, None
    return np.concatenate(mem), np.concatenate(head), np.concatenate(members)


def z(x, moments):
    return (x - moments[0]) / moments[1]


def run_cell(ds, proto: Protocol, preset: str, overrides: dict, diagnose: bool) -> dict:
    split = make_split(ds, proto)
    fit_normal, _ = split_calibration(split.train_normal, DEFAULT_CALIBRATION_FRACTION, proto.seed)
    split = replace(split, train_normal=fit_normal)
    det = make_detector("fusion", preset, dict(overrides, seed=proto.seed))
    t0 = time.monotonic()
    det.fit(split.train_normal, split.train_anomalies)
    out = {"seed": proto.seed, "known_class": proto.known_class, "fit_s_cached": round(time.monotonic() - t0, 1)}
    if getattr(det, "member_separation", None):
        out["member_separation"] = det.member_separation  # every member's d', before half were kept
    if getattr(det, "recon_evidence", None):
        out["recon_evidence"] = det.recon_evidence  # the reconstruction gate's AUROCs and whether it opened
    has_masks = any(r.mask_path for r in split.test if r.label == 1)
    if has_masks or not diagnose:
        pred = det.predict(split.test, batch_size=det.config["test_batch_size"])
        m = evaluate_prediction(pred.records, pred.scores, pred.maps, split.seen_types)
        out.update({k: m[k] for k in ("image_auroc", "pixel_auroc", "pro_auc", "image_auroc_seen",
                                      "image_auroc_unseen") if k in m})
    if diagnose:
        arr, recs, _ = IMAGE_CACHE.load_many(split.test, det.config["image_size"])
        y = np.array([r.label for r in recs])
        mem, head, members = parts(det, arr)
        cal, w = det.calib, float(det.config["head_weight"])
        fused = z(mem, cal["knn_img"]) if head is None else (1 - w) * z(mem, cal["knn_img"]) + w * z(
            head, cal["head_img"])
        out["fused_auroc"] = float(roc_auc_score(y, fused))  # equals image_auroc: the same formula
        out["image_auroc"] = out.get("image_auroc", out["fused_auroc"])
        out["memory_auroc"] = float(roc_auc_score(y, mem))
        if head is not None:
            out["head_auroc"] = float(roc_auc_score(y, head))
            if members.shape[1] > 1:
                out["head_member_aurocs"] = [float(roc_auc_score(y, m)) for m in members.T]
            tn = y == 0  # diagnostic only: each part's scale from the test normals
            oracle = (1 - w) * z(mem, [mem[tn].mean(), mem[tn].std()]) + w * z(head, [head[tn].mean(), head[tn].std()])
            out["fused_auroc_test_moments"] = float(roc_auc_score(y, oracle))
            out["calib"] = {k: det.calib[k] for k in ("knn_img", "head_img", "knn_patch")}
            out["feature_dim"] = int(det.dim)
            out["test_normal_moments"] = {"knn_img": [float(mem[tn].mean()), float(mem[tn].std())],
                                          "head_img": [float(head[tn].mean()), float(head[tn].std())]}
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    over = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return name, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--setting", default="general")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--known-class", nargs="*", default=None,
                    help="hard setting: the seen classes, one run each (default: every class)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,key=value (JSON values); NAME alone = the defaults")
    ap.add_argument("--diagnose", nargs="*", default=None,
                    help="variants whose parts' AUROCs are computed too (one more scoring pass; default: the first)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--recon-trajectory", action="store_true",
                    help="record the reconstruction gate's AUROC after every epoch of its training")
    ap.add_argument("--feature-cache", help="file of remembered backbone outputs: read if present, written at the end")
    a = ap.parse_args()
    if a.recon_trajectory:
        record_recon_trajectory()
    if a.feature_cache and Path(a.feature_cache).exists():
        STORES.update(torch.load(a.feature_cache))
    n_cached = sum(len(s) for s in STORES.values())
    ds = resolve_dataset(a.data)
    classes = [None]
    if a.setting == "hard":
        classes = a.known_class or ds.defect_types
    variants = [parse_variant(v) for v in (a.variant or ["base"])]
    diagnose = set(variants[0][0:1] if a.diagnose is None else a.diagnose)
    results = {"data": ds.name, "setting": a.setting, "shots": a.shots, "preset": a.preset, "seeds": a.seeds,
               "variants": {}}
    for seed in a.seeds:  # seed-major: one seed's features serve every variant before the next
        for kc in classes:
            for name, over in variants:
                r = run_cell(ds, Protocol(a.setting, a.shots, seed, kc), a.preset, over, name in diagnose)
                results["variants"].setdefault(name, {"overrides": over, "runs": []})["runs"].append(r)
                members = r.get("head_member_aurocs")
                print(f"{name:14s} seed {seed} {kc or '-':8s} " + "  ".join(
                    f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float) and k != "fit_s_cached")
                    + (f"  members {' '.join(f'{x:.3f}' for x in members)}" if members else ""), flush=True)
                ev = r.get("recon_evidence") or {}
                if ev.get("trajectory"):
                    print(f"{'':14s} gate: memory {ev['memory']:.3f}, reconstruction by epoch "
                          + " ".join(f"{x:.3f}" for x in ev["trajectory"]) + f" -> {'open' if ev['open'] else 'closed'}",
                          flush=True)
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(results, indent=2))
    if a.feature_cache and sum(len(s) for s in STORES.values()) > n_cached:
        torch.save(STORES, a.feature_cache)
    print()
    for name, v in results["variants"].items():
        for key in ("image_auroc", "pixel_auroc", "pro_auc", "memory_auroc", "head_auroc", "fused_auroc_test_moments"):
            vals = [r[key] for r in v["runs"] if key in r]
            if vals:
                print(f"{name:14s} {key:26s} {np.mean(vals):.4f} ± {np.std(vals):.4f}  "
                      f"({' / '.join(f'{x:.3f}' for x in vals)})")


if __name__ == "__main__":
    main()

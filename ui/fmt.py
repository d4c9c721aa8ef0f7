"""Words for numbers: what produced a run, durations, counts, metric names."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Mapping

METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "image_aupr": "Image AUPR",
    "image_auroc_seen": "AUROC · seen defect types",
    "image_auroc_unseen": "AUROC · unseen defect types",
    "pixel_auroc": "Pixel AUROC",
    "base_image_auroc": "Image AUROC · its base model",
    "base_image_aupr": "Image AUPR · its base model",
    "test_images_per_s": "Images / s (inference)",
    "pro_auc": "PRO (per-region overlap)",
    "operating_point_frr_promised": "False rejects promised at the operating point",
    "operating_point_frr_test": "False rejects at the operating point · held-out normals",
    "operating_point_recall_test": "Recall at the operating point",
    "salient_fraction": "Mean salient fraction of the pseudo anomalies",
    "reconstruction_kept": "Reconstruction part kept (1) or dropped (0)",
    "gate_memory_auroc": "Gate · memory's AUROC on the labelled anomalies",
    "gate_reconstruction_auroc": "Gate · reconstruction's AUROC on the labelled anomalies",
    "best_f1_threshold": "Best-F1 threshold on the test labels (a reference only)",
}


def metric_name(key: str) -> str:
    """A run metric's name for people; each head's own AUROC is named after its head."""
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    if key.startswith("head_") and key.endswith("_image_auroc"):
        return f"Image AUROC · {key[len('head_'):-len('_image_auroc')]} head alone"
    return key

PRESET_HINTS = {
    "tiny": "tiny — seconds, for trying the app",
    "quick": "quick — minutes on a CPU",
    "paper": "paper — the published settings; GPU recommended",
}

STATUS_ICONS = {"queued": ":material/hourglass_empty:", "running": ":material/settings:",
                "done": ":material/check_circle:", "failed": ":material/cancel:", "cancelled": ":material/stop_circle:"}


def num(v: Any, nd: int = 3) -> str:
    if v is None:
        return "—"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if not math.isfinite(f) else f"{f:.{nd}f}"


def duration(seconds: float | None, compact: bool = False) -> str:
    """"2 min 14 s"; ``compact`` for narrow tiles: "2m 14s", "1h 05m"."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    sec, mins, hours = ("s", "m", "h") if compact else (" s", " min", " h")
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}{sec}"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}{mins} {s:02d}{sec}"
    h, m = divmod(m, 60)
    return f"{h}{hours} {m:02d}{mins}"


def duration_short(seconds: float | None) -> str:
    return duration(seconds, compact=True)


def ago(when: datetime | None) -> str:
    if when is None:
        return "—"
    secs = (datetime.now(timezone.utc) - when).total_seconds()
    if secs < 60:
        return "just now"
    if secs < 3600:
        return f"{int(secs // 60)} min ago"
    if secs < 86400:
        return f"{int(secs // 3600)} h ago"
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def protocol_text(p: Mapping[str, Any] | None) -> str:
    p = p or {}
    if not p:
        return "protocol —"
    shots = p.get("shots")
    s = f"{p.get('setting', 'general')}, {shots} shot{'s' if shots != 1 else ''}, seed {p.get('seed')}"
    if p.get("known_class"):
        s += f", known type {p['known_class']}"
    return s


def run_title(run) -> str:
    """Short name of a run for pickers: "Run 12 · dra · quick · 10 shots"."""
    p = run.protocol_json or {}
    shots = p.get("shots")
    extra = f" · {shots} shot{'s' if shots != 1 else ''}" if shots is not None else ""
    return f"Run {run.id} · {run.method} · {run.preset or '—'}{extra}"


def provenance(run) -> str:
    """Everything that produced a run's numbers, in one line."""
    parts = [
        f"run {run.id}" + (f" by {run.created_by}" if getattr(run, "created_by", None) else ""),
        f"method {run.method}",
        f"preset {run.preset or '—'}",
        protocol_text(run.protocol_json),
        f"seen types: {', '.join(run.seen_defect_types) if run.seen_defect_types else 'none'}",
        f"backbone {run.backbone or '—'} [{run.weights or 'weights unknown'}]",
        f"device {run.device or '—'}",
    ]
    if run.n_train_normal is not None:
        parts.append(f"trained on {run.n_train_normal} normal + {run.n_train_anomaly} anomalies, "
                     f"tested on {run.n_test} held-out images")
    if run.train_seconds is not None:
        parts.append(f"training {duration(run.train_seconds)}")
    skipped = skipped_text(run)
    if skipped:
        parts.append(skipped)
    return " · ".join(parts)


def skipped_text(run) -> str | None:
    """'N unreadable image(s) skipped, e.g. …' when a run had to leave images out."""
    sk = (run.config_json or {}).get("skipped_images")
    if not sk:
        return None
    first = f", e.g. {sk['first'][0]}" if sk.get("first") else ""
    return f"{sk['count']} unreadable image(s) skipped{first}"


def weights_warning(run) -> str | None:
    if run.weights_source == "random":
        return (f"Run {run.id} used a randomly initialised backbone ({run.weights}); its numbers say little "
                "about what the method can do with ImageNet weights.")
    return None


def counts_line(c: Mapping[str, Any]) -> str:
    types = ", ".join(f"{t} {n}" for t, n in sorted(c.get("anomaly_by_type", {}).items()))
    an = f"{c['anomaly']} anomaly" + (f" ({types})" if types else "")
    return f"{c['images']:,} images · {c['normal']:,} normal · {an} · {c['unlabeled']:,} unlabelled"


def display_range(run, fallback: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """The run's fixed heatmap colour range (config ``display``), else ``fallback``."""
    d = (run.config_json or {}).get("display") or {}
    lo, hi = d.get("heatmap_vmin"), d.get("heatmap_vmax")
    if lo is None or hi is None or not hi > lo:
        return fallback
    return float(lo), float(hi)

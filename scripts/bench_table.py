#!/usr/bin/env python
"""One markdown table from the JSON files that `python -m osad_core benchmark --json` writes.

    python scripts/bench_table.py bench_results/saliencycut_quick [more files or folders ...]

One line per (data, setting, shots, method, settings given with --set). Image AUROC is
mean ± population std over seeds; in the hard setting each seed's value is first averaged
over the seen classes (the papers' "mean" column) and the per-class values are listed too.
Pixel AUROC and PRO appear where the test set has masks. An AHL line is followed by its
stage-A base model's AUROC on the same runs ("base_aurocs" in the JSON). A SaliencyCut line
is followed by its anomaly head's AUROC alone and the mean salient fraction of its pseudo
anomalies (same runs); ``--heads`` adds a line for every head the runs recorded.

    python scripts/bench_table.py [--heads] PATH ...

``--by-class`` prints the hard-setting rows instead as one column per seen class (image AUROC,
then pixel AUROC / PRO where there are masks), with the mean over the classes each method ran.

    python scripts/bench_table.py --by-class bench_results/mtile_hard
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

NAMES = {"dra": "DRA", "devnet": "DevNet", "ahl": "AHL", "saliencycut": "SaliencyCut", "bgad": "BGAD",
         "ckaad": "CKAAD", "fusion": "Fusion"}
# overrides that describe the machine or the backbone, not a method variant
NOT_A_VARIANT = {"device", "backbone", "weights", "weights_path", "base"}
# heads whose AUROC alone follows a method's line by default (--heads: every recorded head)
HEAD_LINES = {"saliencycut": ("anomaly",)}


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "-"


def per_seed_mean(rows: list[dict], key: str) -> list[float]:
    """One value per seed: the mean over the rows (seen classes) that ran that seed."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        for seed, v in zip(r["seeds"], r[key]):
            by_seed.setdefault(seed, []).append(v)
    return [float(np.mean(v)) for _, v in sorted(by_seed.items())]


def per_seed_run_mean(rows: list[dict], key: str) -> list[float]:
    """Like per_seed_mean for a metric of the runs (pixel AUROC, PRO): one value per seed, the
    mean over the seen classes, so "±" stays a spread over seeds also in the hard setting."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        for run in r["_runs"]:
            if key in run["metrics"]:
                by_seed.setdefault(run["protocol"]["seed"], []).append(run["metrics"][key])
    return [float(np.mean(v)) for _, v in sorted(by_seed.items())]


def per_class(rows: list[dict], key: str) -> str:
    """'mono 0.70 ± 0.03, poly …': each seen class over all its seeds, also when the seeds of
    one class come from several files."""
    by_class: dict[str, list[float]] = {}
    for r in rows:
        if r["known_class"]:
            by_class.setdefault(r["known_class"], []).extend(r[key])
    return ", ".join(f"{k} {mean_std(v)}" for k, v in sorted(by_class.items())) or "-"


def label(row: dict) -> str:
    over = row.get("overrides") or {}
    name = NAMES.get(row["method"], row["method"])
    if row["method"] == "ahl":
        name = f"AHL({NAMES.get(row.get('base') or over.get('base', 'dra'), '?')})"
    variant = ", ".join(f"{k}={v}" for k, v in sorted(over.items()) if k not in NOT_A_VARIANT)
    return f"{name} ({variant})" if variant else name


def load(paths: list[str]) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            continue
        for row in data["rows"]:
            # this row's runs, for pixel metrics (benchmark writes runs in row order, one per seed)
            runs = [r for r in data.get("runs", []) if r["method"] == row["method"]
                    and r["protocol"].get("known_class") == row["known_class"]]
            row["_runs"] = runs[:len(row["aurocs"])]
            row["_file"] = f.name
            rows.append(row)
    return rows


def head_lines(rs: list[dict], data, setting, shots, seeds: str, pixel: bool, all_heads: bool) -> list[str]:
    """'its <name> head alone' lines of one group (only heads every row recorded)."""
    keys = set.intersection(*({k for k in r if k.startswith("head_") and k.endswith("_image_aurocs")} for r in rs))
    wanted = None if all_heads else HEAD_LINES.get(rs[0]["method"], ())
    out = []
    for key in sorted(keys):
        head = key[len("head_"):-len("_image_aurocs")]
        if wanted is not None and head not in wanted:
            continue
        note = "same runs" + (", negated" if head == "normal" else "")
        if not out and all("salient_fractions" in r for r in rs):  # once, on the first head line
            note += f"; mean salient fraction {mean_std(per_seed_mean(rs, 'salient_fractions'))}"
        out.append(f"| {data} | {setting} | {shots} | its {head} head alone ({note}) | "
                   f"{mean_std(per_seed_mean(rs, key))} | {per_class(rs, key)} | "
                   + ("- | - | " if pixel else "") + f"- | - | {seeds} |")
    return out


def table(rows: list[dict], all_heads: bool = False) -> str:
    groups: dict[tuple, list[dict]] = {}
    several_backbones = len({(r["backbone"], r["weights"]) for r in rows}) > 1
    several_presets = len({r["preset"] for r in rows}) > 1
    for r in rows:
        name = label(r) + (f" [{r['backbone']}, {r['weights']}]" if several_backbones else "")
        name += f", {r['preset']} preset" if several_presets else ""
        groups.setdefault((r["data"], r["setting"], r["shots"], name), []).append(r)
    pixel = any("pixel_auroc" in run["metrics"] for r in rows for run in r["_runs"])
    head = "| data | setting | shots | method | image AUROC | per seen class | "
    head += "pixel AUROC | PRO | " if pixel else ""
    head += "train s | test img/s | seeds |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for (data, setting, shots, name), rs in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        per_seed = per_seed_mean(rs, "aurocs")
        classes = per_class(rs, "aurocs")
        line = f"| {data} | {setting} | {shots} | {name} | {mean_std(per_seed)} | {classes} | "
        if pixel:
            for key in ("pixel_auroc", "pro_auc"):
                line += mean_std(per_seed_run_mean(rs, key)) + " | "
        seeds = " ".join(map(str, sorted({seed for r in rs for seed in r["seeds"]})))
        line += (f"{np.mean([r['train_s_mean'] for r in rs]):.0f} | {np.mean([r['images_per_s'] for r in rs]):.0f} | "
                 f"{seeds} |")
        out.append(line)
        if all("base_aurocs" in r for r in rs):
            base = per_seed_mean(rs, "base_aurocs")
            base_classes = per_class(rs, "base_aurocs")
            out.append(f"| {data} | {setting} | {shots} | its base, {NAMES.get(rs[0].get('base'), '?')} "
                       f"(stage A of the same runs) | {mean_std(base)} | {base_classes} | "
                       + ("- | - | " if pixel else "") + f"- | - | {seeds} |")
        out += head_lines(rs, data, setting, shots, seeds, pixel, all_heads)
    # older runs wrote "1 threads"
    info = {(r["preset"], r["backbone"], r["weights"], r["device"].replace("1 threads", "1 thread")) for r in rows}
    for preset, backbone, weights, device in sorted(info, key=str):
        out.append(f"\npreset {preset}; backbone {backbone} [{weights}]; device {device}")
    out.append("std: population std over seeds; hard: per seed the mean over the seen classes")
    return "\n".join(out)


def by_class(rows: list[dict]) -> str:
    """Hard setting, one column per seen class: per method a line of image AUROC and, where the
    runs have masks, a line of pixel AUROC / PRO (each the mean over that class's seeds). "mean"
    is over the classes the method ran (their number in brackets when some are missing)."""
    rows = [r for r in rows if r["setting"] == "hard" and r["known_class"]]
    classes = sorted({r["known_class"] for r in rows})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["shots"], label(r)), []).append(r)
    head = "| data | shots | method | " + " | ".join(classes) + " | mean | train s | seeds |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for (data, shots, name), rs in sorted(groups.items()):
        cls = {k: [r for r in rs if r["known_class"] == k] for k in classes}
        ran = [k for k in classes if cls[k]]
        note = f" ({len(ran)} of {len(classes)})" if len(ran) < len(classes) else ""
        image = {k: float(np.mean([a for r in cls[k] for a in r["aurocs"]])) for k in ran}
        seeds = " ".join(map(str, sorted({seed for r in rs for seed in r["seeds"]})))
        train = np.mean([r["train_s_mean"] for r in rs])
        out.append(f"| {data} | {shots} | {name} | " + " | ".join(f"{image[k]:.3f}" if k in image else "–"
                                                                  for k in classes)
                   + f" | {np.mean(list(image.values())):.3f}{note} | {train:.0f} | {seeds} |")
        maps = {k: [float(np.mean([run["metrics"][key] for r in cls[k] for run in r["_runs"]]))
                    for key in ("pixel_auroc", "pro_auc")]
                for k in ran if all("pro_auc" in run["metrics"] for r in cls[k] for run in r["_runs"])
                and any(r["_runs"] for r in cls[k])}
        if maps:
            mean = np.mean(list(maps.values()), axis=0)
            out.append(f"| {data} | {shots} | {name}: pixel AUROC / PRO | "
                       + " | ".join(f"{maps[k][0]:.3f} / {maps[k][1]:.3f}" if k in maps else "–" for k in classes)
                       + f" | {mean[0]:.3f} / {mean[1]:.3f} | | {seeds} |")
    return "\n".join(out)


def main(args: list[str]) -> None:
    paths = [a for a in args if not a.startswith("--")]
    if not paths:
        sys.exit(__doc__)
    rows = load(paths)
    if not rows:
        sys.exit(f"no benchmark JSON in {' '.join(paths)}")
    print(by_class(rows) if "--by-class" in args else table(rows, all_heads="--heads" in args))


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python
"""Every detector in every benchmark cell, in one table, from the JSON the benchmarks wrote.

    python scripts/bench_overview.py [--root bench_results]

Cells: HeadCT general 10 / 1, ELPV general 10 / 1, ELPV hard 10 (mean of mono and poly seen),
magnetic tile general 10 and hard 10 (mean of the five seen types), image AUROC as mean ± std
over seeds (hard: per seed first the mean over the seen classes), then pixel AUROC / PRO on
magnetic tile. SOURCES says which files and which settings make each cell, so every number
can be traced to its runs; a cell whose runs are missing prints "–", one with fewer than three
seeds says which it has. Files come from `python -m osad_core benchmark --json` (read with
`bench_table.load`) or, for Fusion, from `scripts/bench_fusion_variants.py` (one variant).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table import load

CELLS = [("headct", "general", 10), ("headct", "general", 1), ("elpv", "general", 10), ("elpv", "general", 1),
         ("elpv", "hard", 10), ("magnetic_tile", "general", 10), ("magnetic_tile", "hard", 10)]
CELL_NAMES = ["HeadCT 10", "HeadCT 1", "ELPV 10", "ELPV 1", "ELPV hard 10", "MT 10", "MT hard 10"]
FUSION_M4K2 = {"head_members": 4, "head_keep": 0.5}
FUSION_DEFAULT = {"recon_weight": 0.333333}  # 4 / 2 and the reconstruction part behind its gate

# method -> {cell index: (glob under the root, selection, note)}. Selection: "method" (and
# "base" for AHL) picks rows of CLI files, "overrides" keeps rows whose --set values include
# these, "stage_a" reads the AHL rows' own stage-A model, "variant" picks Fusion's overrides.
_AHL = {"method": "ahl", "base": "dra"}


def _fusion(variant: dict, names: list[str]) -> dict[int, tuple[str, dict, str]]:
    """One Fusion variant's cells: its bench_fusion_variants.py files, in CELLS order."""
    return {i: (f"fusion_variants/{n}.json", {"variant": variant}, "c") for i, n in enumerate(names)}


def _stack(weight: str, parts: tuple[str, ...]) -> dict[int, tuple[str, dict, str]]:
    """One weight's cells of scripts/bench_fusion_stack.py (1.000: CKAAD alone, on today's code)."""
    names = ["headct_general_10", "headct_general_1", "elpv_general_10", "elpv_general_1", "elpv_hard_10",
             "magnetic_tile_general_10", "magnetic_tile_hard_10"]
    return {i: (f"fusion_stack/{n}.json", {"stack": weight, "parts": parts}, "s") for i, n in enumerate(names)}


SOURCES: dict[str, dict[int, tuple[str, dict, str]]] = {
    "DRA": {
        0: ("spine_headct_lite0.json", {"method": "dra"}, ""),
        1: ("saliencycut_quick/headct_general_1_dra.json", {"method": "dra"}, ""),
        2: ("spine_elpv_lite0.json", {"method": "dra"}, ""),
        3: ("saliencycut_quick/elpv_general_1_dra.json", {"method": "dra"}, ""),
        4: ("saliencycut_quick14/elpv_hard_10_dra-quick-s*.json", {"method": "dra"}, ""),
        5: ("mtile_general/dra_s*.json", {"method": "dra"}, ""),
        6: ("mtile_hard/dra_*_s*.json", {"method": "dra"}, ""),
    },
    "DevNet": {
        0: ("spine_headct_lite0.json", {"method": "devnet"}, ""),
        1: ("devnet160/headct_general_1_devnet.json", {"method": "devnet"}, ""),
        2: ("spine_elpv_lite0.json", {"method": "devnet"}, ""),
        3: ("devnet160/elpv_general_1_devnet.json", {"method": "devnet"}, ""),
        4: ("devnet160/elpv_hard_10_*_devnet.json", {"method": "devnet"}, ""),
        5: ("mtile_general/devnet_s*.json", {"method": "devnet"}, ""),
        6: ("mtile_hard/devnet_*_s*.json", {"method": "devnet"}, ""),
    },
    "SaliencyCut": {
        0: ("saliencycut_quick/headct_general_10_saliencycut-iteration.json", {"method": "saliencycut"}, ""),
        1: ("oneshot/headct_general_1_saliencycut.json", {"method": "saliencycut"}, ""),
        2: ("saliencycut_quick/elpv_general_10_saliencycut-iteration-s*.json", {"method": "saliencycut"}, ""),
        3: ("oneshot/elpv_general_1_saliencycut.json", {"method": "saliencycut"}, ""),
        4: ("saliencycut_quick14/elpv_hard_10_saliencycut-quick-s*.json", {"method": "saliencycut"}, ""),
        5: ("mtile_general/saliencycut_s*.json", {"method": "saliencycut"}, ""),
        6: ("mtile_hard/saliencycut_*_s*.json", {"method": "saliencycut"}, ""),
    },
    "SaliencyCut quick14": {
        0: ("saliencycut_quick14/headct_general_10_saliencycut-quick14-s*.json", {"method": "saliencycut"}, ""),
        2: ("saliencycut_quick14/elpv_general_10_saliencycut-quick14-s*.json", {"method": "saliencycut"}, ""),
        4: ("saliencycut_quick14/elpv_hard_10_saliencycut-quick14-s*.json", {"method": "saliencycut"}, ""),
    },
    "AHL(DRA)": {
        0: ("ahl_quick_gpu/stage_a_heads/headct_general_10_ahl-dra-*.json", _AHL, "g"),
        1: ("ahl_quick_cpu/headct_general_1_ahl-dra-s*.json", _AHL, ""),
        2: ("ahl_quick_gpu/stage_a_heads/elpv_general_10_ahl-dra-*.json", _AHL, "g"),
        3: ("ahl_quick_gpu/stage_a_heads/elpv_general_1_ahl-dra-*.json", _AHL, "g"),
        4: ("ahl_quick_gpu/stage_a_heads/elpv_hard_10_*ahl-dra-*.json", _AHL, "g"),
        5: ("mtile_general/ahl_s*.json", {"method": "ahl"}, ""),
        6: ("mtile_hard/ahl_*_s*.json", {"method": "ahl"}, ""),
    },
    "BGAD": {
        0: ("bgad_ckaad_quick/headct_general_10_bgad-codeloss.json", {"method": "bgad"}, ""),
        1: ("oneshot/headct_general_1_bgad_ckaad.json", {"method": "bgad"}, ""),
        2: ("bgad_ckaad_quick/elpv_general_10_bgad-codeloss.json", {"method": "bgad"}, ""),
        3: ("oneshot/elpv_general_1_bgad_ckaad.json", {"method": "bgad"}, ""),
        4: ("bgad_ckaad_quick/elpv_hard_10_*_bgad-codeloss.json", {"method": "bgad"}, ""),
        5: ("masks_quick/magnetic_tile_bgad_masks-true_seed*.json", {"method": "bgad"}, ""),
        6: ("mtile_hard/bgad_*_s*.json", {"method": "bgad"}, ""),
    },
    "CKAAD": {
        0: ("bgad_ckaad_quick/headct_general_10_ckaad.json", {"method": "ckaad"}, ""),
        1: ("oneshot/headct_general_1_bgad_ckaad.json", {"method": "ckaad"}, ""),
        2: ("bgad_ckaad_quick/elpv_general_10_ckaad.json", {"method": "ckaad"}, ""),
        3: ("oneshot/elpv_general_1_bgad_ckaad.json", {"method": "ckaad"}, ""),
        4: ("bgad_ckaad_quick/elpv_hard_10_*_ckaad.json", {"method": "ckaad"}, ""),
        5: ("masks_quick/magnetic_tile_ckaad_masks-true_seed*.json", {"method": "ckaad"}, ""),
        6: ("mtile_hard/ckaad_*_s*.json", {"method": "ckaad"}, ""),
    },
    "Fusion, 8 members, 4 kept": _fusion({"head_members": 8, "head_keep": 0.5}, [
        "headct_general_10_keep_seed*", "headct_general_1_keep8", "elpv_general_10_keep", "elpv_general_1_keep8",
        "elpv_hard_10_keep8", "magnetic_tile_general_10_keep", "magnetic_tile_hard_10_seed*_keep8*"]),
    "Fusion, 4 members, 2 kept, no reconstruction": _fusion(FUSION_M4K2, [
        "headct_general_10_members4", "headct_general_1_members4", "elpv_general_10_members4",
        "elpv_general_1_members4", "elpv_hard_10_members4", "magnetic_tile_general_10_members4",
        "magnetic_tile_hard_10_seed*_m*"]),
    "CKAAD, December code": _stack("1.000", ("ckaad",)),
    "Fusion + CKAAD stacked, w = 1/3": _stack("0.333", ("fusion", "ckaad")),
    "Fusion (default: 4 / 2, reconstruction behind its gate)": _fusion(FUSION_DEFAULT, [
        "headct_general_10_gate", "headct_general_1_gate", "elpv_general_10_gate", "elpv_general_1_gate",
        "elpv_hard_10_gate", "magnetic_tile_general_10_gate", "magnetic_tile_hard_10_s*_gate"]),
}
NOTES = {
    "a": "DevNet's own model inside AHL(DevNet) runs (stage A: the quick schedule at 224 px, not 160)",
    "g": "trained on the GPU machine (H100), so its train s is not a CPU time",
    "s": "scripts/bench_fusion_stack.py: Fusion (default) and CKAAD (quick) fitted apart on the cell's split, "
         "image scores z-normalised on the held-out normals and stacked as (1 − w)·Fusion + w·CKAAD (w = 1: "
         "CKAAD alone, a run of today's code); train s is the fits' (Fusion's with its feature pass)",
    "c": "Fusion's fit with the backbone features already cached (scripts/bench_fusion_variants.py), "
         "so train s leaves out the feature pass",
}


def runs_of(root: Path, pattern: str, sel: dict) -> list[dict]:
    """One dict per (seed, seen class): image AUROC, train s and, where measured, pixel AUROC / PRO."""
    files = sorted(root.glob(pattern))
    out = []
    if "stack" in sel:  # scripts/bench_fusion_stack.py: scores stacked after the fact, one weight
        for f in files:
            for r in json.loads(f.read_text())["runs"]:
                train_s = sum(r[p]["fit_s"] for p in sel.get("parts", ("fusion", "ckaad")))
                out.append({"seed": r["seed"], "cls": r["known_class"], "auroc": r["auroc"][sel["stack"]],
                            "train_s": train_s, "pixel": None, "pro": None})
        return dedupe(out)
    if "variant" in sel:
        for f in files:
            data = json.loads(f.read_text())
            for v in data.get("variants", {}).values():
                if all(v["overrides"].get(k) == val for k, val in sel["variant"].items()):
                    for r in v["runs"]:
                        out.append({"seed": r["seed"], "cls": r.get("known_class"), "auroc": r["image_auroc"],
                                    "train_s": r.get("fit_s_cached"), "pixel": r.get("pixel_auroc"),
                                    "pro": r.get("pro_auc")})
        return dedupe(out)
    for row in load([str(f) for f in files]):
        if row["method"] != sel["method"] or (sel.get("base") and row.get("base") != sel["base"]):
            continue
        if any(row.get("overrides", {}).get(k) != v for k, v in sel.get("overrides", {}).items()):
            continue
        key = "base_aurocs" if sel.get("stage_a") else "aurocs"
        for i, (seed, auroc) in enumerate(zip(row["seeds"], row[key])):
            run = row["_runs"][i]["metrics"] if i < len(row["_runs"]) else {}
            out.append({"seed": seed, "cls": row["known_class"], "auroc": auroc,
                        "train_s": None if sel.get("stage_a") else row["train_s_mean"],
                        "pixel": run.get("pixel_auroc"), "pro": run.get("pro_auc")})
    return dedupe(out)


def dedupe(runs: list[dict]) -> list[dict]:
    """The last file's run per (seed, seen class): a re-run replaces, it does not count twice."""
    return list({(r["seed"], r["cls"]): r for r in runs}.values())


def complete(runs: list[dict]) -> list[dict]:
    """Only seeds that ran every seen class the cell has (hard setting), so that a seed's mean is
    never over fewer types than another's while a sweep is still running."""
    classes = {r["cls"] for r in runs}
    by_seed: dict[int, set] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], set()).add(r["cls"])
    return [r for r in runs if by_seed[r["seed"]] == classes]


def summary(runs: list[dict], key: str) -> tuple[float, float, list[int]] | None:
    by_seed: dict[int, list[float]] = {}
    for r in complete(runs):
        if r[key] is not None:
            by_seed.setdefault(r["seed"], []).append(r[key])
    if not by_seed:
        return None
    v = np.array([np.mean(x) for _, x in sorted(by_seed.items())])
    return float(v.mean()), float(v.std()), sorted(by_seed)


def fmt(s, seeds_wanted=3) -> str:
    if s is None:
        return "–"
    mean, std, seeds = s
    txt = f"{mean:.3f} ± {std:.3f}"
    return txt if len(seeds) >= seeds_wanted else f"{mean:.3f} (seed{'s' if len(seeds) > 1 else ''} "\
        f"{','.join(map(str, seeds))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="bench_results")
    a = ap.parse_args()
    root = Path(a.root)
    out = ["| method | " + " | ".join(CELL_NAMES) + " | MT 10 pixel / PRO | MT hard 10 pixel / PRO |",
           "|---" * (len(CELL_NAMES) + 3) + "|"]
    times = ["| method | " + " | ".join(CELL_NAMES) + " |", "|---" * (len(CELL_NAMES) + 1) + "|"]
    best: dict[int, tuple[float, str]] = {}
    used_notes: set[str] = set()
    for method, cells in SOURCES.items():
        line, tline, maps = [], [], []
        for i in range(len(CELLS)):
            if i not in cells:
                line.append("–")
                tline.append("–")
                continue
            pattern, sel, note = cells[i]
            runs = runs_of(root, pattern, sel)
            # hard cells need every seen class of a seed, or the seed's mean is over fewer types
            s = summary(runs, "auroc")
            mark = f" {note}" if note and runs else ""
            used_notes |= {note} if mark else set()
            line.append(fmt(s) + mark)
            t = [r["train_s"] for r in complete(runs) if r["train_s"] is not None]
            tline.append(f"{np.mean(t):.0f}{mark}" if t else "–")
            paper_method = not method.startswith("Fusion") and "quick14" not in method
            if paper_method and s and len(s[2]) >= 3 and s[0] > best.get(i, (0.0, ""))[0]:
                best[i] = (s[0], method)
            if CELLS[i][0] == "magnetic_tile":
                px, pro = summary(runs, "pixel"), summary(runs, "pro")
                maps.append(f"{px[0]:.3f} / {pro[0]:.3f}" if px and pro else "–")
        out.append(f"| {method} | " + " | ".join(line) + " | " + " | ".join(maps or ["–", "–"]) + " |")
        times.append(f"| {method} | " + " | ".join(tline) + " |")
    out.append("| best of the six (3 seeds) | " + " | ".join(
        f"{best[i][1]} {best[i][0]:.3f}" if i in best else "–" for i in range(len(CELLS))) + " | | |")
    print("Image AUROC, mean ± population std over seeds (hard: per seed the mean over the seen classes);")
    print("a cell with fewer than 3 seeds names them.\n")
    print("\n".join(out))
    print("\nTrain seconds, mean over the runs of the cell (wall time under the load of its runs):\n")
    print("\n".join(times))
    for k in sorted(used_notes):
        print(f"\n{k}: {NOTES[k]}")


if __name__ == "__main__":
    main()

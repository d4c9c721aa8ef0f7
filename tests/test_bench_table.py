"""scripts/bench_table.py: the one table every benchmark script prints."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[1] / "scripts/bench_table.py")
bench_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_table)


def row(method, seeds, aurocs, known=None, setting="general", **extra):
    return dict(method=method, data="elpv", setting=setting, shots=10, known_class=known, preset="quick",
                auroc_mean=float(np.mean(aurocs)), auroc_std=float(np.std(aurocs)), aurocs=aurocs, seeds=seeds,
                train_s_mean=100.0, images_per_s=20.0, backbone="B", weights="W", device="CPU", **extra)


def write(path, *rows):
    path.write_text(json.dumps({"rows": list(rows), "runs": []}))
    return str(path)


def test_hard_setting_averages_seen_classes_per_seed_then_over_seeds(tmp_path):
    f = write(tmp_path / "hard.json", row("dra", [0, 1], [0.6, 0.8], "mono", "hard"),
              row("dra", [0, 1], [0.8, 1.0], "poly", "hard"))
    text = bench_table.table(bench_table.load([f]))
    # per seed: (0.6 + 0.8) / 2 = 0.7 and (0.8 + 1.0) / 2 = 0.9 -> 0.800 ± 0.100
    assert "| elpv | hard | 10 | DRA | 0.800 ± 0.100 | mono 0.700 ± 0.100, poly 0.900 ± 0.100 |" in text


def test_seeds_from_separate_files_form_one_line_and_variants_another(tmp_path):
    files = [write(tmp_path / f"s{s}.json", row("saliencycut", [s], [a])) for s, a in ((0, 0.7), (1, 0.9))]
    files.append(write(tmp_path / "it.json", row("saliencycut", [0], [0.5], overrides={"pseudo_refresh": "iteration",
                                                                                         "device": "cpu"})))
    lines = bench_table.table(bench_table.load(files)).splitlines()
    assert any(x.startswith("| elpv | general | 10 | SaliencyCut | 0.800 ± 0.100 |") and x.endswith("| 0 1 |")
               for x in lines)
    assert any(x.startswith("| elpv | general | 10 | SaliencyCut (pseudo_refresh=iteration) | 0.500 ± 0.000 |")
               for x in lines)


def test_files_that_are_not_benchmarks_are_skipped(tmp_path):
    (tmp_path / "other.json").write_text("[1, 2]")
    assert bench_table.load([str(tmp_path)]) == []
    with pytest.raises(SystemExit):
        bench_table.main([str(tmp_path)])


def test_hard_rows_split_by_class_and_seed_across_files_are_merged_per_class(tmp_path):
    files = [write(tmp_path / f"{k}{s}.json", row("dra", [s], [a], k, "hard"))
             for k, s, a in (("mono", 0, 0.6), ("mono", 1, 0.8), ("poly", 0, 0.8), ("poly", 1, 1.0))]
    text = bench_table.table(bench_table.load(files))
    assert "| DRA | 0.800 ± 0.100 | mono 0.700 ± 0.100, poly 0.900 ± 0.100 |" in text


def with_runs(r, *maps):
    """A row with one run per seed carrying pixel AUROC and PRO."""
    runs = [dict(method=r["method"], protocol=dict(seed=s, known_class=r["known_class"]),
                 metrics=dict(pixel_auroc=p, pro_auc=q)) for s, (p, q) in zip(r["seeds"], maps)]
    return r, runs


def write_runs(path, r, runs):
    path.write_text(json.dumps({"rows": [r], "runs": runs}))
    return str(path)


def test_hard_pixel_metrics_average_seen_classes_per_seed_before_the_spread(tmp_path):
    files = [write_runs(tmp_path / f"{k}.json", *with_runs(row("bgad", [0], [a], k, "hard"), (p, q)))
             for k, a, p, q in (("crack", 0.6, 0.6, 0.2), ("fray", 0.8, 0.8, 0.4))]
    text = bench_table.table(bench_table.load(files))
    # one seed: the spread over seeds is 0 although the two classes differ
    assert "| BGAD | 0.700 ± 0.000 | crack 0.600 ± 0.000, fray 0.800 ± 0.000 | 0.700 ± 0.000 | 0.300 ± 0.000 |" in text


def test_by_class_matrix_has_a_column_per_seen_class_and_marks_missing_ones(tmp_path):
    files = [write_runs(tmp_path / f"b{k}.json", *with_runs(row("bgad", [0, 1], [a, a + 0.2], k, "hard"),
                                                             (0.5, 0.1), (0.7, 0.3)))
             for k, a in (("crack", 0.5), ("fray", 0.7))]
    files.append(write(tmp_path / "d.json", row("dra", [0], [0.9], "fray", "hard")))
    lines = bench_table.by_class(bench_table.load(files)).splitlines()
    assert lines[0] == "| data | shots | method | crack | fray | mean | train s | seeds |"
    assert "| elpv | 10 | BGAD | 0.600 | 0.800 | 0.700 | 100 | 0 1 |" in lines
    assert "| elpv | 10 | BGAD: pixel AUROC / PRO | 0.600 / 0.200 | 0.600 / 0.200 | 0.600 / 0.200 | | 0 1 |" in lines
    # DRA ran one of the two classes and has no maps: no second line
    assert "| elpv | 10 | DRA | – | 0.900 | 0.900 (1 of 2) | 100 | 0 |" in lines
    assert not any(x.startswith("| elpv | 10 | DRA: pixel") for x in lines)


overview_spec = importlib.util.spec_from_file_location("bench_overview",
                                                       Path(__file__).parents[1] / "scripts/bench_overview.py")
bench_overview = importlib.util.module_from_spec(overview_spec)
overview_spec.loader.exec_module(bench_overview)


def test_overview_keeps_only_seeds_that_ran_every_seen_class(tmp_path):
    [write(tmp_path / f"{k}{s}.json", row("dra", [s], [a], k, "hard"))
             for k, s, a in (("mono", 0, 0.6), ("poly", 0, 0.8), ("mono", 1, 0.4))]
    runs = bench_overview.runs_of(tmp_path, "*.json", {"method": "dra"})
    mean, std, seeds = bench_overview.summary(runs, "auroc")
    # seed 1 has mono only: its 0.4 must not count as a seed's mean over both classes
    assert seeds == [0] and mean == pytest.approx(0.7) and std == 0
    assert bench_overview.fmt((mean, std, seeds)) == "0.700 (seed 0)"


def test_overview_reads_one_variant_of_fusion_variant_files(tmp_path):
    run = dict(known_class=None, image_auroc=0.9, fit_s_cached=10.0, pixel_auroc=0.8, pro_auc=0.6)
    (tmp_path / "v.json").write_text(json.dumps({"variants": {
        "base": {"overrides": {"head_members": 1}, "runs": [dict(run, seed=0, image_auroc=0.1)]},
        "keep8": {"overrides": {"head_members": 8, "head_keep": 0.5},
                  "runs": [dict(run, seed=s, image_auroc=a) for s, a in ((0, 0.9), (1, 0.8), (2, 0.7))]}}}))
    runs = bench_overview.runs_of(tmp_path, "v.json", {"variant": {"head_members": 8, "head_keep": 0.5}})
    mean, std, seeds = bench_overview.summary(runs, "auroc")
    assert seeds == [0, 1, 2] and mean == pytest.approx(0.8)
    assert bench_overview.summary(runs, "pro")[0] == pytest.approx(0.6)


def test_overview_reads_one_weight_of_the_stack_study(tmp_path):
    runs = [{"seed": s, "known_class": None, "fusion": {"fit_s": 10.0}, "ckaad": {"fit_s": 5.0},
             "auroc": {"0.000": 0.9, "0.333": a, "1.000": 0.7}} for s, a in ((0, 0.95), (1, 0.93), (2, 0.91))]
    (tmp_path / "s.json").write_text(json.dumps({"runs": runs}))
    both = bench_overview.runs_of(tmp_path, "s.json", {"stack": "0.333", "parts": ("fusion", "ckaad")})
    assert bench_overview.summary(both, "auroc")[0] == pytest.approx(0.93) and both[0]["train_s"] == 15.0
    alone = bench_overview.runs_of(tmp_path, "s.json", {"stack": "1.000", "parts": ("ckaad",)})
    assert bench_overview.summary(alone, "auroc")[0] == pytest.approx(0.7) and alone[0]["train_s"] == 5.0

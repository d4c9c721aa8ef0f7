"""SaliencyCut: saliency masks, the patch residual, the pasted pseudo anomalies, persistence
and tiny training runs (METHODS.md §4)."""
import copy

import numpy as np
import pytest
import torch

from osad_core import augment
from osad_core.backbones import fold_batchnorm
from osad_core.data import load_folder
from osad_core.methods import load_detector, make_detector
from osad_core.methods.dra import ResidualHead
from osad_core.methods.saliencycut import (LayoutPlan, back_project, block_side, corner_layout, draw_layout,
                                           make_test_layouts, patch_residual)
from osad_core.protocol import Protocol, make_split
from conftest import cross_device_tol

TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64, "epochs": 2, "steps_per_epoch": 2}


def built(overrides=None):
    # the tests below feed hand-made CPU tensors to the model, so it stays on the CPU
    det = make_detector("saliencycut", "tiny", {**TINY, "device": "cpu", **(overrides or {})})
    det._build(fresh=True)
    det.prepare_training(np.zeros((2, 64, 64, 3), np.uint8), np.zeros((1, 64, 64, 3), np.uint8),
                         np.random.default_rng(0))
    return det


# -- saliency ---------------------------------------------------------------------------
def test_saliency_map_shape_range_and_location_follow_the_gradient():
    g = torch.zeros(2, 3, 96, 96)
    g[0, :, 10:30, 60:80] = 1.0  # strong gradient top right
    g[1, 1, 70:90, 5:25] = -3.0  # sign and channel do not matter, magnitude does
    sal = augment.saliency_map(g, grid=18)
    assert sal.shape == (2, 96, 96)
    assert sal.min() >= 0 and sal.max() <= 1
    for i in range(2):
        assert sal[i].min() == 0 and sal[i].max() == pytest.approx(1.0)
    m0, m1 = sal[0] > 0.4, sal[1] > 0.4
    ys, xs = torch.nonzero(m0, as_tuple=True)
    assert 10 <= ys.float().mean() <= 30 and 60 <= xs.float().mean() <= 80
    ys, xs = torch.nonzero(m1, as_tuple=True)
    assert 70 <= ys.float().mean() <= 90 and 5 <= xs.float().mean() <= 25
    # smoothed: the salient region is a blob around the hot square, not the whole image
    assert 0.02 < m0.float().mean() < 0.3
    # a flat gradient gives an all-zero map, not NaN
    assert torch.equal(augment.saliency_map(torch.zeros(1, 3, 32, 32)), torch.zeros(1, 32, 32))


def test_bspline_kernel_is_the_quadratic_spline_of_the_paper():
    k = augment.bspline_kernel(24)  # 448 px / 18 cells -> stride 24, support 70 px (METHODS.md §4.3)
    assert k.numel() == 70 and torch.allclose(k, k.flip(0))
    # copies shifted by the stride sum to one: the upsampled map has no grid ripple
    total = torch.zeros(24 * 10)
    for i in range(8):
        total[i * 24:i * 24 + 70] += k
    assert torch.allclose(total[70:150], torch.ones(80), atol=1e-5)


def test_model_saliency_is_the_input_gradient_of_the_loss():
    det = built()
    x = augment.test_transform(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    before = [p.detach().clone() for p in det.model.parameters()]
    det._layout_rng, _ = np.random.default_rng(5), torch.manual_seed(5)
    sal = det.saliency(x)
    assert sal.shape == (3, 64, 64) and sal.min() >= 0 and sal.max() <= 1
    assert all(p.grad is None for p in det.model.parameters())  # no parameter gradients formed
    assert all(torch.equal(a, b) for a, b in zip(before, det.model.parameters()))
    assert not torch.equal(sal[0], sal[1])  # depends on the image
    # by hand: eval mode, images labelled normal, gradient of the two-head loss w.r.t. the input
    det._layout_rng, _ = np.random.default_rng(5), torch.manual_seed(5)
    det.model.eval()
    xi = x.clone().requires_grad_(True)
    loss = det.loss(det.forward(xi, train=True), torch.zeros(3, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, xi)
    assert torch.allclose(sal, augment.saliency_map(g, det.config["saliency_grid"]), atol=1e-6)


# -- patch-wise residual -------------------------------------------------------------------
def test_patch_residual_matches_its_formula_on_a_known_tensor():
    f = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) ** 1.5
    lay = np.array([[0, 0], [3, 1], [1, 3], [2, 2]])
    b = 3
    w = [f[:, :, r:r + b, c:c + b] for r, c in lay]
    expect = w[3] - w[2] + w[1] - w[0]  # R = w4 - (w3 - (w2 - w1))
    got = patch_residual(f, lay, b)
    assert got.shape == (2, 3, 3, 3)
    assert torch.allclose(got, expect)
    # hand-checked element: position (0, 0) of channel 0, sample 0
    v = lambda r, c: float(f[0, 0, r, c])  # noqa: E731
    assert got[0, 0, 0, 0].item() == pytest.approx(v(2, 2) - v(1, 3) + v(3, 1) - v(0, 0))
    # a constant map has zero residual; identical blocks cancel pairwise
    assert torch.equal(patch_residual(torch.ones(1, 2, 6, 6), lay, b), torch.zeros(1, 2, 3, 3))


def test_block_sides_and_layouts():
    assert [block_side(s, "half") for s in (14, 7, 4, 2, 1)] == [7, 4, 2, 1, 1]
    assert [block_side(s, "code") for s in (14, 7)] == [8, 4]  # the official code's floor(s/2)+1
    rng = np.random.default_rng(0)
    d = draw_layout(14, 8, "diagonal", rng)
    assert (d[:, 0] == d[:, 1]).all() and len(set(d[:, 0])) == 4 and d.max() <= 6
    f = draw_layout(14, 7, "free", rng)
    assert len({tuple(o) for o in f}) == 4 and f.min() >= 0 and f.max() <= 7
    assert draw_layout(1, 1, "free", rng) is None  # no four distinct blocks on a 1x1 map
    # the corner layout covers every position, so the stored test layouts do too
    for s in (14, 7, 4, 2):
        b = block_side(s)
        _, cnt = back_project(torch.zeros(1, b, b), corner_layout(s, b, rng), b, s)
        assert (cnt > 0).all()
        lays = make_test_layouts(s, b, "free", 5, rng)
        assert lays.shape == (5, 4, 2)
    assert make_test_layouts(1, 1, "free", 5, rng) is None


def test_back_projection_adds_block_scores_to_their_sources():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    acc, cnt = back_project(a, [[0, 0], [0, 1], [2, 2], [1, 0]], 2, 4)
    assert cnt.tolist() == [[1, 2, 1, 0], [2, 3, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert acc[0, 0].tolist() == [1, 3, 2, 0] and acc[0, 3].tolist() == [0, 0, 3, 4]


def _one_conv_per_layout(head, f, lays, b, s):
    """The scoring path's definition: the head on each layout's residual, |maps| added back
    onto the four source blocks and divided by the coverage."""
    n, L = f.shape[0], len(lays)
    a = head(torch.cat([patch_residual(f, lay, b) for lay in lays]))
    acc, cnt = f.new_zeros(n, s, s), f.new_zeros(s, s)
    for lay, al in zip(lays, a.view(L, n, b, b)):
        da, dc = back_project(al.abs(), lay, b, s)
        acc += da
        cnt += dc
    return a, acc / cnt.clamp_min(1)


@pytest.mark.parametrize("s, offsets, kind", [(5, "free", "blocks"), (3, "free", "blocks"), (2, "free", "blocks"),
                                              (9, "free", "residuals"), (7, "diagonal", "blocks")])
def test_layout_plan_scores_every_layout_as_one_convolution_per_layout_does(s, offsets, kind):
    """Quick's 5x5 and 3x3 maps (and tiny's 2x2) convolve their 9 and 4 distinct blocks
    instead of 16 residuals; a 9x9 map (more distinct blocks than layouts) convolves each
    residual once; the code's diagonal offsets on a 7x7 map use 4 blocks.
    Head maps and back-projected maps equal the one-convolution-per-layout path to float
    rounding, with BatchNorm as trained and folded."""
    torch.manual_seed(s)
    C, n, b = 24, 3, block_side(s)
    head = ResidualHead(C)
    bn = head.body[1]
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_(1, 0.3)
    bn.bias.data.normal_(0, 0.3)
    head.eval()
    lays = torch.from_numpy(make_test_layouts(s, b, offsets, 16, np.random.default_rng(s)))
    plan = LayoutPlan.build(s, b, lays)
    assert plan.kind == kind and plan.combine.shape[0] == 16
    assert len(plan.basis) == {5: 9, 3: 4, 2: 4, 7: 4}.get(s, len(plan.basis)) <= 16
    f = torch.randn(n, C, s, s).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref_a, ref_m = _one_conv_per_layout(head, f, lays, b, s)
        for h in (head, fold_batchnorm(copy.deepcopy(head))):
            a, m = plan.head(h, f, b)
            assert a.shape == (16 * n, b, b) and m.shape == (n, s, s)
            assert (a - ref_a).abs().max() <= 1e-5 * ref_a.abs().max()
            assert (m - ref_m).abs().max() <= 1e-5 * ref_m.abs().max()


def test_layout_plan_convolves_a_residual_shared_by_several_layouts_once():
    # the order of the blocks within each sign does not change R = w4 - w3 + w2 - w1
    lays = torch.tensor([[[0, 0], [0, 1], [1, 0], [1, 1]], [[1, 0], [1, 1], [0, 0], [0, 1]],
                         [[0, 0], [0, 1], [1, 1], [1, 0]]])
    plan = LayoutPlan.build(3, 2, lays)
    assert plan.kind == "residuals" and len(plan.basis) == 2
    assert plan.combine.tolist() == [[1, 0], [1, 0], [0, 1]]
    head = ResidualHead(4).eval()
    f = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        a, m = plan.head(head, f, 2)
        ref_a, ref_m = _one_conv_per_layout(head, f, lays, 2, 3)
    assert torch.equal(a[:2], a[2:4])  # layouts 0 and 1, each of the 2 images
    assert torch.allclose(a, ref_a, rtol=1e-5, atol=1e-6) and torch.allclose(m, ref_m, rtol=1e-5, atol=1e-6)


def test_heads_score_map_and_loss():
    det = built()
    assert [(s["side"], s["block"]) for s in det.scales] == [(2, 1), (1, 1)]  # 64 px and its 32 px copy
    assert det.scales[0]["layouts"].shape == (4, 4, 2) and det.scales[1]["layouts"] is None
    det.model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = det.forward(x, train=False)
        again = det.forward(x, train=False)
    assert {k for k in out if not k.startswith("_")} == {"normal", "anomaly"}
    assert torch.equal(out["anomaly"][0], again["anomaly"][0])  # fixed layouts: deterministic
    assert torch.allclose(det.score(out), out["anomaly"][0] - out["normal"][0])
    m = det.anomaly_map(out, 16)
    assert m.shape == (3, 16, 16) and (m >= 0).all()
    with torch.no_grad():
        tr = det.forward(x, train=True)  # one random layout: a score but no map
    assert tr["anomaly"][0].shape == (3,) and tr["anomaly"][1] is None
    y = torch.tensor([0, 1, 2])
    right = {"normal": (torch.tensor([50.0, 0.0, 0.0]), None), "anomaly": (torch.tensor([0.0, 50.0, 50.0]), None)}
    assert det.loss(right, y).item() < 0.1  # both heads right about every sample
    wrong = {"normal": (torch.tensor([0.0, 50.0, 0.0]), None), "anomaly": right["anomaly"]}
    assert det.loss(wrong, y).item() > 1.5


def test_bad_variant_names_fail_fast():
    with pytest.raises(ValueError, match="pseudo_refresh"):
        make_detector("saliencycut", "tiny", {"pseudo_refresh": "sometimes"})
    with pytest.raises(ValueError, match="patch_offsets"):
        make_detector("saliencycut", "tiny", {"patch_offsets": "spiral"})


# -- pseudo anomalies ------------------------------------------------------------------------
def test_pasted_pseudo_anomaly_differs_from_its_source_only_inside_the_mask():
    rng = np.random.default_rng(0)
    xa = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    xb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[5:15, 8:20] = True
    out = augment.saliency_cut(xa, xb, mask)
    assert out.dtype == np.uint8 and out.shape == xa.shape
    changed = np.any(out != xa, axis=2)
    assert not changed[~mask].any() and changed[mask].mean() > 0.9
    assert (out[mask] == xb[mask]).all()
    # tensors, batched
    ta, tb = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    tm = torch.zeros(2, 8, 8, dtype=torch.bool)
    tm[0, :4] = True
    tout = augment.saliency_cut(ta, tb, tm)
    assert torch.equal(tout[:, :, ~tm[0]][0], ta[0][:, ~tm[0]]) and torch.equal(tout[0, :, :4], tb[0, :, :4])
    assert torch.equal(tout[1], ta[1])


def test_per_epoch_refresh_pastes_donor_saliency_into_a_normal():
    det = built({"pseudo_refresh": "epoch", "saliency_donors": 3})
    rng = np.random.default_rng(1)
    normals = rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    det.before_epoch(0, normals, rng)
    idx, masks = det._donors
    assert len(idx) == 3 and masks.shape == (3, 64, 64) and masks.dtype == bool
    assert 0 < masks.mean() < 1
    src = normals[4].copy()
    for _ in range(6):
        out = det.make_pseudo(src, normals, rng)
        # the result is a donor x_a everywhere except where x_a is salient, where x_b (src) shows
        hits = [k for k in range(3) if (out[~masks[k]] == normals[idx[k]][~masks[k]]).all()
                and (out[masks[k]] == src[masks[k]]).all()]
        assert hits


def test_per_iteration_refresh_changes_only_pseudo_slots_outside_the_donor_saliency():
    det = built({"pseudo_refresh": "iteration"})
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 2, 1, 2])
    det.saliency = lambda imgs: torch.cat([torch.ones(len(imgs), 64, 32), torch.zeros(len(imgs), 64, 32)], 2)
    out = det.prepare_batch(x, y, np.random.default_rng(0))
    assert torch.equal(out[[0, 2]], x[[0, 2]])  # normal and seen anomaly untouched
    for j in (1, 3):  # the only label-0 image (row 0) is the donor x_a
        assert torch.equal(out[j, :, :, :32], x[j, :, :, :32])  # salient half of x_a: x_b shows
        assert torch.equal(out[j, :, :, 32:], x[0, :, :, 32:])  # non-salient half: x_a pasted in
    assert not torch.equal(x[1], out[1])


# -- training, persistence ------------------------------------------------------------------
@pytest.fixture
def split(mvtec_dir):
    return make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=0))


def test_tiny_run_save_load_gives_identical_outputs(split, tmp_path):
    det = make_detector("saliencycut", "tiny", TINY).fit(split.train_normal, split.train_anomalies)
    a = det.predict(split.test)
    assert a.scores.shape == (len(split.test),) and np.isfinite(a.scores).all()
    assert a.maps.shape == (len(split.test), 32, 32) and (a.maps >= 0).all() and a.maps.max() > 0
    assert a.embeddings.shape == (len(split.test), 512)
    assert set(a.extra) == {"head_normal", "head_anomaly"}
    np.testing.assert_allclose(a.scores, a.extra["head_anomaly"] - a.extra["head_normal"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.scores, det.predict(split.test).scores)  # deterministic at test time
    path = det.save(tmp_path / "sc.osad")
    back = load_detector(path, device="cpu")
    assert torch.equal(back.scales[0]["layouts"], det.scales[0]["layouts"])
    assert back.config["pseudo_refresh"] == "iteration" and back.config["patch_offsets"] == "free"
    b = back.predict(split.test)
    np.testing.assert_allclose(a.scores, b.scores, **cross_device_tol(det.device, 1e-5, 1e-6))
    np.testing.assert_allclose(a.maps, b.maps, **cross_device_tol(det.device, 1e-4, 1e-6))


def test_anomaly_free_setting_trains_with_pseudo_anomalies_only(mvtec_dir):
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 0, seed=0))
    assert not sp.train_anomalies
    for mode in ("iteration", "epoch"):
        det = make_detector("saliencycut", "tiny", {**TINY, "pseudo_refresh": mode, "epochs": 1})
        det.fit(sp.train_normal, [])
        p = det.predict(sp.test)
        assert np.isfinite(p.scores).all() and len(det.history) == 1 and det.history[0]["loss"] > 0



def test_quick14_preset_gives_the_residual_head_a_14x14_map(split, tmp_path):
    """The quick14 preset: a stride-16 trunk at 224 px, so the patch residual works on a
    14×14 map (blocks of 7) rather than quick's 5×5; saved and loaded, it scores the same."""
    det = make_detector("saliencycut", "quick14", {**TINY, "image_size": 224, "epochs": 1, "steps_per_epoch": 1,
                                                   "batch_size": 6, "test_layouts": 2, "device": "cpu"})
    assert make_detector("saliencycut", "quick14").config["image_size"] == 224
    det.fit(split.train_normal, split.train_anomalies)
    assert [(sc["side"], sc["block"]) for sc in det.scales] == [(14, 7), (7, 4)]
    assert det.channels == 256  # ResNet-18 ends after layer3
    a = det.predict(split.test[:3])
    det.save(tmp_path / "m.osad")
    b = load_detector(tmp_path / "m.osad").predict(split.test[:3])
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


# -- what a run reports beyond its AUROC ------------------------------------------------------
def test_salient_fraction_is_the_mean_share_of_salient_pixels_over_the_pasted_masks():
    det = built({"pseudo_refresh": "iteration"})
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 2, 1, 2])
    det.saliency = lambda imgs: torch.cat([torch.ones(len(imgs), 64, 16), torch.zeros(len(imgs), 64, 48)], 2)
    det.prepare_batch(x, y, np.random.default_rng(0))  # two pseudo slots, each a quarter salient
    assert det.training_metrics() == {"salient_fraction": pytest.approx(0.25)}
    det.saliency = lambda imgs: torch.ones(len(imgs), 64, 64)
    det.prepare_batch(x, torch.tensor([0, 2, 1, 0]), np.random.default_rng(0))  # one more, all salient
    assert det.training_metrics()["salient_fraction"] == pytest.approx((0.25 + 0.25 + 1.0) / 3)
    assert make_detector("saliencycut", "tiny").training_metrics() == {}  # untrained: nothing to report


def test_benchmark_reports_the_anomaly_head_alone_and_the_salient_fraction(mvtec_dir, tmp_path, capsys):
    """One tiny benchmark: the run's metrics, the benchmark row and the table carry the
    anomaly head's own AUROC (and the normality head's, negated) and the salient fraction."""
    import json

    from sklearn.metrics import roc_auc_score

    from osad_core.cli import main
    from osad_core.experiment import metric_detail, train_and_score

    res = train_and_score(load_folder(mvtec_dir), Protocol("general", 2, seed=0), "saliencycut", "tiny", TINY)
    m, p = res.metrics, res.prediction
    labels = [r.label for r in p.records]
    assert m["head_anomaly_image_auroc"] == pytest.approx(roc_auc_score(labels, p.extra["head_anomaly"]))
    assert m["head_normal_image_auroc"] == pytest.approx(roc_auc_score(labels, -p.extra["head_normal"]))
    assert 0 < m["salient_fraction"] < 1
    assert "anomaly head's own score" in metric_detail("head_anomaly_image_auroc")
    assert "pseudo anomaly" in metric_detail("salient_fraction")

    out = tmp_path / "sc.json"
    assert main(["benchmark", "--data", str(mvtec_dir), "--methods", "saliencycut", "--setting", "general",
                 "--shots", "2", "--seeds", "0", "--preset", "tiny", "--backbone", "resnet18", "--weights", "random",
                 "--set", "image_size=64", "--set", "epochs=2", "--set", "steps_per_epoch=2",
                 "--no-db", "--json", str(out)]) == 0
    assert "head_anomaly_image_auroc" in capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][0]
    assert row["aurocs"] == [pytest.approx(m["image_auroc"])]  # the same run as above
    assert row["head_anomaly_image_aurocs"] == [pytest.approx(m["head_anomaly_image_auroc"])]
    assert row["salient_fractions"] == [pytest.approx(m["salient_fraction"])]

    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[1] / "scripts/bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    lines = bench_table.table(bench_table.load([str(out)])).splitlines()
    head = next(x for x in lines if "its anomaly head alone" in x)
    assert f"{m['head_anomaly_image_auroc']:.3f} ± 0.000" in head
    assert f"mean salient fraction {m['salient_fraction']:.3f}" in head
    assert not any("its normal head" in x for x in lines)  # only with --heads
    assert any("its normal head alone (same runs, negated" in x
               for x in bench_table.table(bench_table.load([str(out)]), all_heads=True).splitlines())


def test_benchmark_refuses_a_method_specific_preset_for_the_other_methods_before_running(mvtec_dir, capsys):
    from osad_core.cli import main

    rc = main(["benchmark", "--data", str(mvtec_dir), "--methods", "saliencycut,dra", "--preset", "quick14",
               "--seeds", "0", "--no-db"])
    err = capsys.readouterr()
    assert rc == 2 and "unknown preset 'quick14' for dra" in err.err
    assert "AUROC" not in err.out  # refused before any cell ran

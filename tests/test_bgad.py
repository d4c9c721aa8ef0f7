"""BGAD: flows, boundary loss on known tensors, pseudo anomalies, a tiny run, and the PRO metric."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from osad_core import augment
from osad_core.backbones import build_multiscale
from osad_core.data import load_folder, read_mask
from osad_core.evaluate import pixel_auroc, pro_auc, pro_curve
from osad_core.methods import load_detector, make_detector
from osad_core.methods.bgad import bgad_loss, chunk_boundary, cosine_lr, focal_weights
from osad_core.methods.flows import ConditionalFlow, positional_encoding_2d
from osad_core.protocol import Protocol, make_split
from conftest import cross_device_tol

TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64}


# -- flows -------------------------------------------------------------------------------
def test_flow_log_det_matches_autograd_jacobian():
    torch.manual_seed(0)
    flow = ConditionalFlow(5, cond_dim=4, n_blocks=3, seed=1)
    with torch.no_grad():  # move away from the identity-like initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(1, 5), torch.randn(1, 4)
    _, logdet = flow(x, c)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c)[0][0], x[0])
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-4)
    logp, z = flow.log_prob(x, c)
    expected = -2.5 * math.log(2 * math.pi) - 0.5 * (z ** 2).sum() + logdet
    assert logp.item() == pytest.approx(expected.item(), abs=1e-5)


def test_scoring_path_gives_the_training_paths_log_likelihoods():
    # whole maps of 6 positions for 5 images (odd and even widths), in chunks that end mid-batch
    torch.manual_seed(0)
    for dim in (5, 6):
        flow = ConditionalFlow(dim, cond_dim=4, n_blocks=3, seed=1)
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.3 * torch.randn_like(p))
        table, x = torch.randn(6, 4), torch.randn(30, dim)
        want_lp, want_z = flow.log_prob(x, (table, torch.arange(6).repeat(5)))
        x_before = x.clone()
        for chunk in (1, 12, 4096):
            lp, z = flow.grid_log_prob(x, table, chunk=chunk)
            torch.testing.assert_close(lp, want_lp, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(z, want_z, atol=1e-5, rtol=1e-5)
        assert torch.equal(x, x_before)  # the blocks work on a copy
        lp, z = flow.grid_log_prob(x, table, with_z=False)
        assert z is None
        torch.testing.assert_close(lp, want_lp, atol=1e-4, rtol=1e-5)
        # one vector of one position: x.t() is contiguous already, and must still be copied
        one = torch.randn(1, dim)
        one_before = one.clone()
        torch.testing.assert_close(flow.grid_log_prob(one, table[:1])[0], flow.log_prob(one, table[:1])[0],
                                   atol=1e-4, rtol=1e-5)
        assert torch.equal(one, one_before)
        # a training step changes the weights in place: the folded constants follow
        with torch.no_grad():
            flow.blocks[0].subnet[0].weight.mul_(1.5)
            flow.blocks[1].global_scale.add_(0.2)
        torch.testing.assert_close(flow.grid_log_prob(x, table)[0], flow.log_prob(x, (table, torch.arange(6).repeat(5)))[0],
                                   atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="not whole maps"):
        flow.grid_log_prob(torch.randn(7, 6), table)


def test_flow_starts_with_unit_global_scale_and_a_rotation():
    flow = ConditionalFlow(6, cond_dim=4, n_blocks=2, seed=0)
    b = flow.blocks[0]
    scale = 0.1 * torch.nn.functional.softplus(b.global_scale, beta=0.5)
    torch.testing.assert_close(scale, torch.ones(6))
    torch.testing.assert_close(b.rotation @ b.rotation.t(), torch.eye(6), atol=1e-5, rtol=0)
    assert torch.det(b.rotation).item() == pytest.approx(1.0, abs=1e-5)
    odd = ConditionalFlow(5, 4, 1).blocks[0]
    assert (b.d1, b.d2) == (3, 3) and (odd.d1, odd.d2) == (3, 2)  # x1 takes the extra entry


def test_positional_code_encodes_column_then_row():
    pe = positional_encoding_2d(8, 3, 5)  # 2 frequencies: 1 and 10000^(-1/2)
    assert pe.shape == (8, 3, 5)
    torch.testing.assert_close(pe[0, 1], torch.sin(torch.arange(5.0)))  # column, frequency 1
    torch.testing.assert_close(pe[1, 2], torch.cos(torch.arange(5.0)))
    torch.testing.assert_close(pe[2, 0], torch.sin(torch.arange(5.0) * 0.01))
    torch.testing.assert_close(pe[4, :, 3], torch.sin(torch.arange(3.0)))  # row
    torch.testing.assert_close(pe[7, :, 0], torch.cos(torch.arange(3.0) * 0.01))
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 2, 2)


# -- losses ------------------------------------------------------------------------------
def test_bgad_loss_on_known_values():
    ll = torch.tensor([-2.0, 0.0, -1.5, -5.0])  # per-dimension log-likelihoods
    y = torch.tensor([0, 0, 1, 1])
    # ML only (phase 1): mean NLL of the normals
    loss, parts = bgad_loss(ll, y, push_pull=False)
    assert loss.item() == pytest.approx(1.0)
    # b_n = -0.1 (ℓ/10 scale), b_a = -0.2: the normal at -0.2 is pulled by 0.1, the anomaly at
    # -0.15 pushed by 0.05; the normal above b_n and the anomaly below b_a cost nothing
    loss, parts = bgad_loss(ll, y, -0.1, tau=0.1)
    assert parts["n"] == pytest.approx(0.1) and parts["a"] == pytest.approx(0.05)
    assert loss.item() == pytest.approx(1.0 + 0.15)
    assert bgad_loss(ll, y, -0.1, lam=2.0)[0].item() == pytest.approx(1.0 + 0.3)
    # the code's bounded ML surrogate: -log sigmoid(ℓ)
    l_sig, _ = bgad_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long), ml_loss="logsigmoid")
    assert l_sig.item() == pytest.approx(math.log(2))
    # sums instead of means
    ll2 = torch.tensor([-3.0, -2.0, 0.0, 0.0])
    y2 = torch.tensor([0, 0, 1, 1])
    _, p_mean = bgad_loss(ll2, y2, -0.1)
    _, p_sum = bgad_loss(ll2, y2, -0.1, reduction="sum")
    assert p_mean["n"] == pytest.approx(0.15) and p_sum["n"] == pytest.approx(0.3)
    assert p_mean["a"] == pytest.approx(0.2) and p_sum["a"] == pytest.approx(0.4)


def test_bgad_loss_gradients_pull_normals_up_and_push_anomalies_down():
    ll = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss, _ = bgad_loss(ll, torch.tensor([0, 1]), -0.1)
    loss.backward()
    assert ll.grad[0] < 0 and ll.grad[1] > 0  # descent raises the normal, lowers the anomaly


def test_chunk_boundary_is_the_beta_quantile_over_the_normaliser():
    ll = torch.arange(100.0)
    normal = torch.ones(100, dtype=torch.bool)
    assert chunk_boundary(ll, normal, 0.01, 10.0).item() == pytest.approx(0.1)  # sorted[1] / 10
    assert chunk_boundary(ll, normal, 0.05, 10.0).item() == pytest.approx(0.5)
    assert chunk_boundary(ll, torch.zeros(100, dtype=torch.bool), 0.01, 10.0) is None
    # without a given boundary the loss uses the chunk's own
    y = torch.tensor([0] * 99 + [1])
    _, parts = bgad_loss(ll, y, None, beta=0.05)
    assert parts["b_n"] == pytest.approx(0.4)  # 99 normals: sorted[floor(0.05 * 99)] / 10


def test_focal_weights_follow_the_code_formulas():
    ll = torch.tensor([-1.0, -5.0, -20.0, -5.0])  # u = -0.1, -0.5, -2.0, -0.5
    an = torch.tensor([False, False, True, True])
    w = focal_weights(ll, an)
    assert w[0].item() == 1.0  # normal with u > -0.2
    assert w[1].item() == pytest.approx(11.7 * math.sqrt(1 - math.exp(-0.5)) * 0.5, rel=1e-5)
    assert w[2].item() == 1.0  # anomaly already below u = -1
    assert w[3].item() == pytest.approx(0.53 * (1 + math.exp(-0.5)) ** 2 / 0.5, rel=1e-5)


def test_learning_rate_warms_up_then_decays():
    c = dict(epochs=10, lr=2e-4, lr_min=2e-7, lr_warmup_start=2e-5, warmup_epochs=2)
    assert cosine_lr(0.0, c) == pytest.approx(2e-5)
    peak = cosine_lr(2.0, c)
    assert cosine_lr(1.0, c) == pytest.approx((2e-5 + peak) / 2)
    lrs = [cosine_lr(e, c) for e in range(2, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 2e-7


# -- pseudo anomalies ----------------------------------------------------------------------
def test_foreground_mask_finds_a_bright_object_and_keeps_textures_whole():
    ct = np.zeros((64, 64, 3), np.uint8)
    ct[16:48, 12:52] = 180
    fg = augment.foreground_mask(ct)
    assert fg[32, 32] and not fg[2, 2] and fg.mean() == pytest.approx(32 * 40 / 64 ** 2, abs=0.03)
    tex = np.random.default_rng(0).normal(120, 12, (64, 64, 1)).clip(0, 255).astype(np.uint8).repeat(3, 2)
    assert augment.foreground_mask(tex).all()


def test_paste_defect_stays_in_place_inside_and_moves_into_the_foreground():
    rng = np.random.default_rng(0)
    normal = np.full((64, 64, 3), 100, np.uint8)
    defect = np.full((64, 64, 3), 250, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[30:36, 30:36] = 1
    out, m = augment.paste_defect(normal, defect, mask, rng)  # no foreground: stays
    np.testing.assert_array_equal(m, mask)
    assert (out[m > 0] == 250).all() and (out[m == 0] == 100).all()
    fg = np.zeros((64, 64), bool)
    fg[40:60, 5:25] = True  # the defect lies outside: it must move in
    for _ in range(5):
        out, m = augment.paste_defect(normal, defect, mask, rng, fg)
        assert m.sum() == 36 and fg[m > 0].mean() > 0.5
        assert (out[m > 0] == 250).all() and (out[m == 0] == 100).all()


def test_randaugment_moves_image_and_mask_together():
    rng = np.random.default_rng(1)
    img = np.full((64, 64, 3), 40, np.uint8)
    mask = augment.random_box_mask(64, 64, rng, area=(0.1, 0.1))
    img[mask > 0] = 220
    for _ in range(30):
        a, m = augment.randaugment_pair(img, mask, rng)
        assert a.shape == img.shape and m.shape == mask.shape and a.dtype == np.uint8
        if m.any() and (~m.astype(bool)).any():
            assert a[m > 0].mean() > a[m == 0].mean() + 10  # photometric ops change both sides


def test_multiscale_extractor_levels():
    ex, info = build_multiscale("resnet18", "random", None, (1, 2, 3))
    feats = ex(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert info.layer_strides == (4, 8, 16) and info.channels == 256 and not ex.training
    assert not any(p.requires_grad for p in ex.parameters())
    ex.train()
    assert not ex.training  # stays frozen


# -- a tiny run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts_split(tmp_path_factory):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("bgad") / "parts")
    return make_split(load_folder(root), Protocol("general", 2, seed=0))


@pytest.fixture(scope="module")
def fitted(parts_split):
    sp = parts_split
    det = make_detector("bgad", "tiny", TINY).fit(sp.train_normal, sp.train_anomalies)
    return det, det.predict(sp.test)


def inside_outside(records, maps):
    ins, outs = [], []
    for r, m in zip(records, maps):
        if r.mask_path:
            g = read_mask(r.mask_path, m.shape[-1]).astype(bool)
            ins.append(m[g].mean())
            outs.append(m[~g].mean())
    return np.array(ins), np.array(outs)


def test_bgad_map_is_higher_inside_the_pasted_defect(fitted, parts_split):
    det, pred = fitted
    assert det.mask_sources == {"ground_truth": 2, "image_level": 0, "image_level_as": "coarse"}
    assert det.boundaries is not None and len(det.boundaries) == 3
    ins, outs = inside_outside(pred.records, pred.maps)
    assert len(ins) == 10 and (ins > outs).mean() >= 0.9 and ins.mean() > outs.mean() + 0.3
    assert pixel_auroc(pred.records, pred.maps) > 0.9
    assert pro_auc(pred.records, pred.maps) > 0.5


def test_bgad_shapes_scores_and_save_load(fitted, parts_split, tmp_path):
    det, pred = fitted
    n = len(parts_split.test)
    assert pred.maps.shape == (n, 32, 32) and pred.embeddings.shape == (n, 256) and pred.scores.shape == (n,)
    np.testing.assert_allclose(pred.scores, pred.maps.reshape(n, -1).max(1), rtol=1e-6)  # score = max of A
    labels = np.array([r.label for r in pred.records])
    assert pred.scores[labels == 1].mean() > pred.scores[labels == 0].mean()
    again = load_detector(det.save(tmp_path / "bgad.osad"), device="cpu").predict(parts_split.test)
    np.testing.assert_allclose(again.scores, pred.scores, **cross_device_tol(det.device, 1e-5, 1e-5))
    np.testing.assert_allclose(again.maps, pred.maps, **cross_device_tol(det.device, 1e-5, 1e-5))
    # the flow amplifies TF32 rounding: one CUDA value in 4096 moved by 0.021
    np.testing.assert_allclose(again.embeddings, pred.embeddings, **cross_device_tol(det.device, 1e-5, 1e-5, 5e-2))


@pytest.mark.parametrize("mode", ["coarse", "pasted"])
def test_bgad_trains_from_image_level_labels(parts_split, mode):
    sp = parts_split
    no_masks = [replace(r, mask_path=None) for r in sp.train_anomalies]
    det = make_detector("bgad", "tiny", dict(TINY, image_label_masks=mode, boundary="chunk"))
    det.fit(sp.train_normal, no_masks)
    assert det.mask_sources == {"ground_truth": 0, "image_level": 2, "image_level_as": mode}
    kinds = {k for k, _ in det._entry_kinds()}
    assert kinds == ({"real", "rpag"} if mode == "coarse" else {"rpag"})
    pred = det.predict(sp.test)
    ins, outs = inside_outside(pred.records, pred.maps)
    assert ins.mean() > outs.mean()


def test_bgad_without_anomalies_is_a_normal_only_flow(parts_split):
    fast = dict(TINY, epochs=1, steps_per_epoch=1, stats_max_images=4)
    det = make_detector("bgad", "tiny", fast).fit(parts_split.train_normal, [])
    assert det.boundaries is None and np.isfinite(det.predict(parts_split.test[:2]).scores).all()


def test_bgad_rejects_unknown_variants():
    with pytest.raises(ValueError, match="boundary"):
        make_detector("bgad", "tiny", {"boundary": "sometimes"})
    with pytest.raises(ValueError, match="image_label_masks"):
        make_detector("bgad", "tiny", {"image_label_masks": "guess"})


# -- PRO -----------------------------------------------------------------------------------
def test_pro_curve_is_exact_on_a_known_example():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0:2] = 1  # region A: 2 pixels
    gt[3, 3] = 1  # region B: 1 pixel
    m = np.zeros((4, 4))
    m[0, 0], m[3, 3], m[1, 1] = 3, 2, 1
    fpr, pro = pro_curve([gt, np.zeros((4, 4))], [m, np.zeros((4, 4))])
    # thresholds 3, 2, 1, 0: A half covered -> 0.25; B covered -> 0.75; one false positive of
    # 13 + 16 = 29 normal pixels; finally everything
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 29, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1])


def test_pro_auc_integrates_to_the_fpr_limit(tmp_path):
    from PIL import Image

    from osad_core.data import ImageRecord

    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0:2] = 255
    mask[3, 3] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    recs = [ImageRecord("a.png", 1, "x", "test", str(tmp_path / "m.png")), ImageRecord("b.png", 0, split="test"),
            ImageRecord("c.png", 1, "x", "test")]  # an anomaly without a mask is left out
    m = np.zeros((3, 4, 4))
    m[0, 0, 0], m[0, 3, 3], m[0, 1, 1] = 3, 2, 1
    # curve: 0.75 on [0, 1/29], then linear from (1/29, 0.75) to (1, 1); cut at 0.3
    x1 = 1 / 29
    y_lim = 0.75 + 0.25 * (0.3 - x1) / (1 - x1)
    expected = (0.75 * x1 + (0.75 + y_lim) / 2 * (0.3 - x1)) / 0.3
    assert pro_auc(recs, m) == pytest.approx(expected)
    perfect = np.zeros((3, 4, 4))
    perfect[0] = mask / 255
    assert pro_auc(recs, perfect) == pytest.approx(1.0)
    assert pro_auc(recs[1:2], m[1:2]) is None

"""AHL: HADG's openness rules, the CDL update, ψ's weights, generators, a tiny real run."""
import numpy as np
import pytest
import torch

from osad_core import augment
from osad_core.data import DataError, load_folder
from osad_core.evaluate import evaluate_prediction, image_metrics
from osad_core.methods import load_detector, make_detector
from osad_core.methods.ahl import (
    BalancedSampler,
    CacheLayout,
    ImportanceEstimator,
    StridedCompositeHead,
    base_model_errors,
    build_episodes,
    importance_weights,
)
from osad_core.protocol import Protocol, make_split
from osad_core.train import Callbacks
from conftest import cross_device_tol


# random ResNet-18 at 64 px; a one-epoch base model, three AHL epochs (ψ weights from epoch 2)
TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64,
        "base_overrides": {"epochs": 1, "steps_per_epoch": 2}}

LAYOUT = CacheLayout(30, 10, ("cutmix", "cutpaste", "draem"))
CLUSTERS = np.repeat([0, 1, 2], 10)  # images 0-9, 10-19, 20-29


def _parts(s):
    kinds = [LAYOUT.image_of(r) for r in s.rows]
    normal_imgs = {i for k, i, _ in kinds if k in ("normal", "pseudo")}
    anomalies = {i for k, i, _ in kinds if k == "anomaly"}
    gens = {g for k, _, g in kinds if k == "pseudo"}
    return normal_imgs, anomalies, gens, kinds


# --------------------------------------------------------------------------------------
# HADG
# --------------------------------------------------------------------------------------
def test_hadg_sets_obey_the_openness_rules():
    episodes, info = build_episodes(CLUSTERS, LAYOUT, np.random.default_rng(0))
    assert len(episodes) == 6 and info.fallback is None
    pairs = set()
    for ep in episodes:
        s_imgs, s_an, s_gen, s_kinds = _parts(ep.support)
        q_imgs, q_an, q_gen, q_kinds = _parts(ep.query)
        pairs.add((ep.support.cluster, ep.query.cluster))
        # normals of two different k-means clusters: no image in both sets
        assert ep.support.cluster != ep.query.cluster
        assert s_imgs == set(np.flatnonzero(CLUSTERS == ep.support.cluster))
        assert q_imgs == set(np.flatnonzero(CLUSTERS == ep.query.cluster))
        # disjoint labelled anomalies, half of them in the support set
        assert not s_an & q_an and len(s_an) == 5 and s_an | q_an == set(range(10))
        # pseudo anomalies of two different generators, one generator per set
        assert s_gen == {ep.support.generator} and q_gen == {ep.query.generator}
        assert ep.support.generator != ep.query.generator
        # labels follow the rows: 0 clean normal, 1 labelled anomaly, 2 pseudo anomaly
        for s, kinds in ((ep.support, s_kinds), (ep.query, q_kinds)):
            assert [{"normal": 0, "anomaly": 1, "pseudo": 2}[k] for k, _, _ in kinds] == s.labels.tolist()
    assert len(pairs) == 6  # every ordered pair of the 3 clusters once
    swapped = np.mean([(e.support.labels == 2).sum() / 10 for e in episodes])
    assert 0.2 < swapped < 0.8  # about half of the normals became pseudo anomalies


def test_hadg_single_anomaly_goes_into_both_sets_and_code_variants():
    layout = CacheLayout(30, 1, ("cutmix", "cutpaste", "draem"))
    episodes, _ = build_episodes(CLUSTERS, layout, np.random.default_rng(1))
    for ep in episodes:
        for s in (ep.support, ep.query):
            assert (s.rows[s.labels == 1] == layout.anomaly(0)).all() and (s.labels == 1).sum() == 1

    # the official code's variants: one generator for both sets, prefix "clusters", overlapping query anomalies
    labels = np.array([2, 0, 1] * 10)
    episodes, _ = build_episodes(labels, LAYOUT, np.random.default_rng(2), membership="prefix",
                                 anomaly_split="code", generators="same")
    for ep in episodes:
        assert ep.support.generator == ep.query.generator
        s_imgs, s_an, _, _ = _parts(ep.support)
        q_imgs, q_an, _, _ = _parts(ep.query)
        assert s_imgs == set(range(10)) and q_imgs == set(range(10))  # prefixes of one list
        assert len(s_an) == 5 and len(q_an) == 7 and len(s_an & q_an) >= 0


def test_hadg_falls_back_to_random_halves_without_two_usable_clusters():
    layout = CacheLayout(5, 2, ("cutmix", "cutpaste"))
    episodes, info = build_episodes(np.array([0, 0, 0, 0, 1]), layout, np.random.default_rng(0))
    assert info.fallback and len(episodes) == 6
    for ep in episodes:
        assert not _parts(ep.support)[0] & _parts(ep.query)[0]


def test_balanced_sampler_takes_equal_shares_of_the_kinds_present():
    episodes, _ = build_episodes(CLUSTERS, LAYOUT, np.random.default_rng(0))
    rows, y = BalancedSampler(episodes[0].support, 48, np.random.default_rng(0)).sample()
    assert len(rows) == 48 and np.bincount(y, minlength=3).tolist() == [16, 16, 16]
    assert set(rows.tolist()) <= set(episodes[0].support.rows.tolist())
    no_anomalies = build_episodes(CLUSTERS, CacheLayout(30, 0, ("cutmix",)), np.random.default_rng(0))[0]
    _, y = BalancedSampler(no_anomalies[0].query, 48, np.random.default_rng(0)).sample()
    assert np.bincount(y, minlength=3).tolist() == [24, 0, 24]


# --------------------------------------------------------------------------------------
# CDL
# --------------------------------------------------------------------------------------
class _FixedSampler:
    def sample(self):
        return np.zeros(1, np.int64), np.zeros(1, np.int64)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_cdl_update_follows_the_query_loss_through_the_adapted_model(inner):
    """Support loss |θ - a|², query loss |θ - b|²: the unified gradient must be
    weight · (I - α H_s) · Σ ∇Lq(θ') (second order through the first step), and an outer
    step along it lowers the query loss of the unified weights."""
    det = make_detector("ahl", "tiny", {"inner_lr": 0.1, "inner_optimizer": inner, "steps_per_epoch": 3,
                                        "inner_passes": 1})
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    theta_g = torch.tensor([0.0, 0.0], requires_grad=True)
    calls = []

    def loss_at(theta, rows, y):
        target = a if len(calls) < 1 + 3 else b  # 1 differentiable + 3 adaptation steps, then 3 query batches
        calls.append(1)
        return ((theta[0] - target) ** 2).sum()

    q_loss, theta = det._adapt_and_query([theta_g], loss_at, _FixedSampler(), _FixedSampler(), 0.5, Callbacks())
    adapted = theta[0]
    assert q_loss == pytest.approx(3 * float(((adapted - b) ** 2).sum()), rel=1e-5)
    expected = 0.5 * (1 - 2 * 0.1) * 3 * 2 * (adapted - b)  # H_s = 2 I
    assert torch.allclose(theta_g.grad, expected, atol=1e-5)
    if inner == "sgd":  # θ' moved from θ_g towards a by the support steps
        assert float(((adapted - a) ** 2).sum()) < float(((theta_g.detach() - a) ** 2).sum())
    with torch.no_grad():
        before = float(((theta_g - b) ** 2).sum())
        after = float(((theta_g - 0.1 * theta_g.grad - b) ** 2).sum())
    assert after < before


def test_cdl_episode_on_real_heads_lowers_the_query_loss():
    """DevNet heads on random 'feature maps' where anomalies have a raised channel."""
    det = make_detector("ahl", "tiny", {"base": "devnet", "inner_optimizer": "sgd", "steps_per_epoch": 2})
    det.base = det._make_base()
    det.backbone_info = {"channels": 8}
    det.device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    feats0 = 0.2 * torch.randn(60, 8, 2, 2, generator=g)
    feats0[20:40, 3] += 2.0  # labelled anomalies
    feats0[40:, 5] += 2.0  # pseudo anomalies
    det.cache = [feats0, feats0[:, :, :1, :1].clone()]
    det.ref_feats = None
    from osad_core.methods.ahl import EpisodeSet, HeadNet

    labels = np.array([0] * 20 + [1] * 20 + [2] * 20)
    s = EpisodeSet(np.arange(60), labels, 0, 0)
    sampler = BalancedSampler(s, 30, np.random.default_rng(0))
    torch.manual_seed(0)
    det.headnet = HeadNet(det._make_heads(), det.base.head_outputs)
    names = [k for k, _ in det.headnet.named_parameters()]
    params = list(det.headnet.parameters())
    opt = torch.optim.Adam(params, lr=0.1)

    def loss_at(theta, rows, y):
        out = torch.func.functional_call(det.headnet, dict(zip(names, theta)), (det._batch(rows), None))
        return det._loss(out, torch.as_tensor(y))

    losses = []
    for _ in range(10):
        q, _ = det._adapt_and_query(params, loss_at, sampler, sampler, 1.0, Callbacks())
        losses.append(q)
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.85 * losses[0] and np.mean(losses[-3:]) < np.mean(losses[:3])


# --------------------------------------------------------------------------------------
# ψ
# --------------------------------------------------------------------------------------
def test_psi_weights_sum_to_one_and_favour_the_base_model_with_lower_error():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [2] * 20 + [1] * 20)
    y = (labels != 0).astype(float)
    rows = np.arange(80)
    sets = np.repeat([0, 1], 40)
    pred = np.stack([y + rng.normal(0, s, 80) for s in (0.05, 0.3, 0.6)], 1)
    support = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    for mode in ("paper", "code"):
        r = base_model_errors(pred, labels, rows, sets, support, mode)
        w = importance_weights(r)
        assert w.sum() == pytest.approx(1.0) and (w > 0).all()
        assert r[0] < r[1] < r[2] and w[0] > w[1] > w[2]
    # paper: a base model's own support normals do not count against it
    bad_own = pred.copy()
    bad_own[0:10, 0] = 5.0
    r = base_model_errors(bad_own, labels, rows, sets, support, "paper")
    assert r[0] == pytest.approx(base_model_errors(pred, labels, rows, sets, support, "paper")[0])
    # and anomalies it did not train on weigh double
    support2 = [np.arange(40, 80), np.arange(0), np.arange(0)]
    same = np.tile(np.where(y == 1, 0.5, 0.0)[:, None], (1, 3))
    r = base_model_errors(same, labels, rows, sets, support2, "paper")
    assert r[0] < r[1] == r[2]


def test_psi_learns_to_predict_the_next_epoch_scores():
    torch.manual_seed(0)
    psi = ImportanceEstimator(4, head="paper")
    assert psi(torch.zeros(5, 3, 4)).shape == (5, 4)
    assert ImportanceEstimator(4, head="code")(torch.zeros(2, 3, 4)).shape == (2, 4)
    det = make_detector("ahl", "tiny")
    det.device = torch.device("cpu")
    base = np.linspace(-5, 10, 64)[:, None] * np.array([1.0, 0.5, -0.5, 0.2])  # scores that stay put
    seq = np.repeat(base[:, None, :], 4, axis=1)  # (N, K+1 = 4, T = 4)
    opt = torch.optim.Adam(psi.parameters(), lr=0.03)
    losses = [det._psi_train(psi, opt, seq, np.repeat([0, 1], 32)) for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0]
    pred = det._psi_predict(psi, seq[:, :3])
    assert pred.shape == (64, 4)


def test_composite_head_of_the_released_code_is_constant_unless_fixed():
    torch.manual_seed(0)
    r = torch.randn(4, 16, 7, 7)
    frozen = StridedCompositeHead(16, scale_init=0.0)(r)
    assert frozen.shape == (4, 2, 2) and torch.allclose(frozen, frozen[0, 0])
    fixed = StridedCompositeHead(16, scale_init=1.0)(r)
    assert fixed.std() > 0
    assert StridedCompositeHead(16)(torch.randn(2, 16, 2, 2)).shape == (2, 1, 1)  # small maps are padded


# --------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------
def test_cutpaste_is_dra_cutmix_and_draem_blends_inside_a_perlin_mask():
    img = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    torch.manual_seed(0)  # the colour jitter draws from torch's generator
    a = augment.cutpaste(img, np.random.default_rng(3))
    torch.manual_seed(0)
    np.testing.assert_array_equal(a, augment.cutmix(img, np.random.default_rng(3)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = augment.perlin_mask(64, 64, rng)
        assert m.dtype == bool and 0 < m.mean() < 0.7
    noise = augment.perlin_noise(48, 40, (4, 8), rng)
    assert noise.shape == (48, 40) and -1.5 < noise.min() < 0 < noise.max() < 1.5
    tex = augment.procedural_texture(64, 64, rng)
    assert tex.shape == (64, 64, 3) and tex.dtype == np.uint8 and tex.std() > 5
    flat = np.full((64, 64, 3), 128, np.uint8)
    out = augment.draem_pseudo(flat, rng, tex)
    changed = np.any(out != flat, axis=2)
    assert out.shape == flat.shape and out.dtype == np.uint8
    assert 0 < changed.mean() < 0.7  # a blend inside the mask, the rest untouched


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------
def test_tiny_ahl_dra_run_reports_every_stage_predicts_and_round_trips(mvtec_dir, tmp_path):
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 4, seed=0))
    seen = []
    cb = Callbacks(on_progress=seen.append, every_s=0)
    det = make_detector("ahl", "tiny", dict(TINY, n_episodes=3)).fit(sp.train_normal, sp.train_anomalies, cb)

    stages = [(p.stage_index, p.stage_count, p.stage) for p in seen]
    assert list(dict.fromkeys(stages)) == [(1, 3, "Base model (DRA)"), (2, 3, "Feature cache"), (3, 3, "AHL heads")]
    cache = [p for p in seen if p.stage == "Feature cache"]
    assert cache[-1].step == cache[-1].total > 1 and all(p.metrics == {} for p in cache)  # no loss, never nan
    assert all("nan" not in p.text() for p in seen)
    fr = [p.fraction for p in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0
    # the loss curve runs on across stages as the history does: base epoch 0, no point for the cache (1), AHL 2-4
    assert [p.curve_point for p in seen if p.curve_point is not None] == [h["epoch"] for h in det.history
            if h["stage"] != "cache"] == [0, 2, 3, 4]
    assert set(det.stage_seconds) == {"base", "cache", "ahl"} and all(v > 0 for v in det.stage_seconds.values())
    assert [h["stage"] for h in det.history] == ["base", "cache", "ahl", "ahl", "ahl"]
    assert [h["epoch"] for h in det.history] == [0, 1, 2, 3, 4]
    # ψ: equal weights until it has been trained, then a proper distribution
    w = np.array(det.weight_history)
    assert w.shape == (3, 3) and np.allclose(w.sum(1), 1.0) and np.allclose(w[:2], 1 / 3)
    assert not np.allclose(w[2], 1 / 3)
    assert len(det.hadg_info["episodes"]) == 3

    a = det.predict(sp.test)
    labels = np.array([r.label for r in a.records])
    assert a.maps.shape == (len(sp.test), 32, 32) and a.embeddings.shape == (len(sp.test), 512)
    assert np.isfinite(a.scores).all() and (a.maps >= 0).all()
    assert {"head_normal", "head_seen", "head_pseudo", "head_residual", "base_score"} <= set(a.extra)
    assert image_metrics(labels, a.scores)["image_auroc"] > 0.7
    m = evaluate_prediction(a.records, a.scores, a.maps, sp.seen_types, base_scores=a.extra["base_score"])
    assert m["base_image_auroc"] == image_metrics(labels, a.extra["base_score"])["image_auroc"]
    b = load_detector(det.save(tmp_path / "ahl.osad"), device="cpu").predict(sp.test)
    np.testing.assert_allclose(a.scores, b.scores, **cross_device_tol(det.device, 1e-5, 1e-5))
    np.testing.assert_allclose(a.maps, b.maps, **cross_device_tol(det.device, 1e-4, 1e-5))
    np.testing.assert_allclose(a.embeddings, b.embeddings, **cross_device_tol(det.device, 1e-4, 1e-5))
    np.testing.assert_allclose(a.extra["base_score"], b.extra["base_score"], **cross_device_tol(det.device, 1e-5, 1e-5))


def test_tiny_ahl_devnet_without_psi_uses_equal_weights(mvtec_dir):
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=1))
    over = dict(TINY, base="devnet", use_psi=False, n_episodes=2, epochs=2, head_variant="code")
    det = make_detector("ahl", "tiny", over).fit(sp.train_normal, sp.train_anomalies)
    assert np.allclose(det.weight_history, 0.5)
    pred = det.predict(sp.test)
    assert set(pred.extra) == {"head_seen", "base_score"} and pred.maps.shape == (len(sp.test), 32, 32)
    assert det.describe().startswith("ahl(devnet)")

    no_anomaly = make_split(load_folder(mvtec_dir), Protocol("general", 0))
    with pytest.raises(DataError, match="at least one labelled anomaly"):
        make_detector("ahl", "tiny", over).fit(no_anomaly.train_normal, no_anomaly.train_anomalies)
    with pytest.raises(ValueError, match="unknown AHL base"):
        make_detector("ahl", "tiny", {"base": "bgad"})


def test_benchmark_reports_ahl_and_its_base_from_the_same_runs(mvtec_dir, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from osad_core.cli import main

    out = tmp_path / "ahl.json"
    rc = main(["benchmark", "--data", str(mvtec_dir), "--methods", "ahl", "--setting", "general", "--shots", "3",
               "--seeds", "0", "1", "--preset", "tiny", "--backbone", "resnet18", "--weights", "random",
               "--set", "base_overrides=" + json.dumps(TINY["base_overrides"]), "--set", "n_episodes=2",
               "--no-db", "--json", str(out)])
    assert rc == 0
    assert "its base" in capsys.readouterr().out
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert [r["config"]["n_episodes"] for r in data["runs"]] == [2, 2]  # each run's resolved settings
    assert data["runs"][0]["config"]["heads_init"] == "fresh"
    assert row["base"] == "dra" and len(row["base_aurocs"]) == len(row["aurocs"]) == 2
    assert row["base_auroc_mean"] == pytest.approx(np.mean(row["base_aurocs"]))
    assert row["overrides"]["n_episodes"] == 2

    # the shared table script shows both lines, and the --set variant in the method's name
    spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[1] / "scripts/bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    lines = bench_table.table(bench_table.load([str(out)])).splitlines()
    ahl = next(x for x in lines if x.startswith("| parts | general | 3 | AHL(DRA) ("))
    base = next(x for x in lines if "its base, DRA (stage A of the same runs)" in x)
    assert f"{np.mean(row['aurocs']):.3f}" in ahl and f"{row['base_auroc_mean']:.3f}" in base


def test_heads_can_start_from_the_base_model_and_the_quick_preset_does(mvtec_dir):
    assert make_detector("ahl", "quick").config["heads_init"] == "base"
    assert make_detector("ahl", "paper").config["heads_init"] == "fresh"  # the specification's
    sp = make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=1))
    # unified learning rate 0: the heads never leave their start, the stage-A heads
    over = dict(TINY, base="devnet", heads_init="base", lr=0.0, n_episodes=2, epochs=2)
    pred = make_detector("ahl", "tiny", over).fit(sp.train_normal, sp.train_anomalies).predict(sp.test)
    np.testing.assert_allclose(pred.scores, pred.extra["base_score"], rtol=1e-4, atol=1e-5)
    fresh = make_detector("ahl", "tiny", dict(over, heads_init="fresh")).fit(sp.train_normal, sp.train_anomalies)
    assert not np.allclose(fresh.predict(sp.test).scores, pred.extra["base_score"], rtol=1e-2)

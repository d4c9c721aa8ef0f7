"""CKAAD: losses on known tensors, auto-encoder and discriminator shapes, a tiny run."""
import numpy as np
import pytest
import torch

from osad_core.data import load_folder, read_mask
from osad_core.evaluate import pixel_auroc
from osad_core.methods import load_detector, make_detector
from osad_core.methods.ckaad import (
    FeatureAutoEncoder,
    PatchDiscriminator,
    cosine_map,
    cosine_reconstruction_loss,
    discriminator_loss,
    fake_hinge,
    masked_fake_hinge,
    real_energy,
    topk_pixel_mean,
)
from osad_core.protocol import Protocol, make_split
from conftest import cross_device_tol
from osad_core.train import seed_everything

# the offline ImageNet EfficientNet-Lite0 keeps the auto-encoder small (112-channel levels)
TINY = {"backbone": "efficientnet_lite0", "image_size": 64}


# -- losses --------------------------------------------------------------------------------
def test_energy_terms_on_known_values():
    e1 = [torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0]])]  # two levels
    assert real_energy(e1).item() == pytest.approx(2.0 + 2.0)  # level means, summed
    # hinge at a = 5: max(0, 5 - e) -> level 1: (4 + 2) / 2, level 2: 3
    assert fake_hinge(e1, 5.0).item() == pytest.approx(3.0 + 3.0)
    assert fake_hinge([torch.tensor([7.0, 9.0])], 5.0).item() == 0.0  # beyond the margin: free
    pos, neg, rec = [torch.tensor([1.0])], [torch.tensor([2.0])], [torch.tensor([4.0])]
    # T(F+) + (1 - γ) Fk(F-) + γ Fk(G): 1 + 0.5 * 3 + 0.5 * 1
    assert discriminator_loss(pos, neg, rec, 5.0, 0.5).item() == pytest.approx(3.0)
    assert discriminator_loss(pos, neg, rec, 5.0, 0.0).item() == pytest.approx(4.0)


def test_masked_anomaly_term_covers_the_defect_positions_only():
    e = [torch.tensor([[[1.0, 4.0], [2.0, 6.0]]])]  # one image, one 2×2 level
    ones = torch.ones(1, 1, 4, 4)
    assert masked_fake_hinge(e, ones, 5.0).item() == pytest.approx(fake_hinge(e, 5.0).item())  # label only
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 0] = 1  # one defect pixel in the top-left cell: only that cell's hinge (5 - 1)
    assert masked_fake_hinge(e, m, 5.0).item() == pytest.approx(4.0)
    m[0, 0, 3, 3] = 1  # and the bottom-right (6 ≥ 5: free) -> (4 + 0) / 2
    assert masked_fake_hinge(e, m, 5.0).item() == pytest.approx(2.0)
    pos, rec = [torch.tensor([[[1.0]]])], [torch.tensor([[[4.0]]])]
    neg = [torch.tensor([[[2.0, 9.0]]])]
    mask = torch.tensor([[[[1.0, 0.0]]]])  # the 9 lies outside the defect: it no longer lowers the term
    assert discriminator_loss(pos, neg, rec, 5.0, 0.5, anomaly_masks=mask).item() == pytest.approx(1 + 1.5 + 0.5)


def test_cosine_reconstruction_loss_and_map():
    f = torch.randn(2, 8, 4, 4)
    assert cosine_reconstruction_loss([f], [f]).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_reconstruction_loss([f], [-f]).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_reconstruction_loss([f], [3 * f]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert cosine_reconstruction_loss([f, f], [f, -f]).item() == pytest.approx(2.0, abs=1e-6)  # summed
    # per-position map: one flipped position -> 2 there, 0 elsewhere; levels add up
    r = f.clone()
    r[:, :, 1, 2] *= -1
    m = cosine_map([f], [r], 4)
    assert m.shape == (2, 4, 4) and m[:, 1, 2].allclose(torch.full((2,), 2.0), atol=1e-5)
    assert m.sum().item() == pytest.approx(4.0, abs=1e-4)
    g = torch.randn(2, 8, 2, 2)
    up = cosine_map([f, g], [r, -g], 4)
    assert up.shape == (2, 4, 4) and torch.allclose(up - m, torch.full_like(m, 2.0), atol=1e-5)


def test_cosine_map_equals_cosine_similarity_and_interpolate():
    import torch.nn.functional as F

    from osad_core.smoothing import resize_maps

    g = torch.Generator().manual_seed(0)
    f, r = torch.randn(3, 8, 5, 5, generator=g), torch.randn(3, 8, 5, 5, generator=g)
    r[0, :, 2, 2] = 0  # a zero vector: the floored norm, as F.cosine_similarity floors it
    want = F.interpolate(1 - F.cosine_similarity(f, r, dim=1)[:, None], size=(12, 12), mode="bilinear",
                         align_corners=True)[:, 0]
    torch.testing.assert_close(cosine_map([f], [r], 12), want, atol=1e-5, rtol=1e-5)
    # the resize alone, up and down, square and not, both corner conventions
    m = torch.randn(2, 6, 9, generator=g)
    for size in (4, 9, 16, 64):
        for ac in (False, True):
            want = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=ac)[:, 0]
            torch.testing.assert_close(resize_maps(m, size, ac), want, atol=1e-5, rtol=1e-5)


def test_topk_pixel_mean():
    m = torch.zeros(1, 4, 4)
    m[0, 0, :3] = torch.tensor([5.0, 3.0, 1.0])
    assert topk_pixel_mean(m, 2).item() == pytest.approx(4.0)
    assert topk_pixel_mean(m, 100).item() == pytest.approx(9 / 16)  # k capped at the map size


def test_discriminator_energy_is_non_negative_and_scale_free():
    d = PatchDiscriminator(16)
    f = torch.randn(3, 16, 5, 5)
    e = d(f)
    assert e.shape == (3, 5, 5) and (e >= 0).all()
    torch.testing.assert_close(d(7 * f), e)  # features are L2-normalised per position


# -- architecture ----------------------------------------------------------------------------
def test_auto_encoder_resnet18_medical_configuration():
    ae = FeatureAutoEncoder([128, 256], [64, 128, 256, 512], [2, 3], "basic", 2, [2, 2])
    feats = [torch.randn(2, 128, 8, 8), torch.randn(2, 256, 4, 4)]
    recs, z = ae(feats)
    assert [r.shape for r in recs] == [f.shape for f in feats]
    assert z.shape == (2, 512, 2, 2) and ae.z_channels == 512
    assert isinstance(ae.bottleneck[0].body[1], torch.nn.InstanceNorm2d) and ae.bottleneck[0].body[1].affine


def test_auto_encoder_bottleneck_configuration():
    # the Wide-ResNet-50-2 layout (256/512/1024 channels, 3 levels) at 1/16 of the width
    ae = FeatureAutoEncoder([16, 32, 64], [16, 32, 64, 128], [1, 2, 3], "bottleneck", 3, [3, 4, 6])
    assert len(ae.down[0]) == 6  # level 1 -> level 3: two stride-2 convs (each + IN, ReLU)
    assert [len(s) for s in ae.up] == [3, 4, 6] and len(ae.bottleneck) == 3
    assert ae.bottleneck[0].body[0].out_channels == 64  # inner width = the deepest channels
    feats = [torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8), torch.randn(2, 64, 4, 4)]
    recs, z = ae(feats)
    assert [r.shape for r in recs] == [f.shape for f in feats] and z.shape == (2, 128, 2, 2)


def test_auto_encoder_needs_consecutive_levels():
    with pytest.raises(ValueError, match="consecutive"):
        FeatureAutoEncoder([64, 256], [64, 128, 256, 512], [1, 3], "basic", 2, [2, 2])


def test_map_smoothing_and_top_k_scale_with_the_map():
    det = make_detector("ckaad", "paper")
    assert det.smoothing_sigma() == 4.0 and det.topk() == 100
    det = make_detector("ckaad", "quick")  # 64-px maps
    assert det.smoothing_sigma() == 1.0 and det.topk() == 6
    with pytest.raises(ValueError, match="generator_loss"):
        make_detector("ckaad", "tiny", {"generator_loss": "gan"})


# -- a tiny run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts_split(tmp_path_factory):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("ckaad") / "parts")
    return make_split(load_folder(root), Protocol("general", 2, seed=0))


@pytest.fixture(scope="module")
def fitted(parts_split):
    sp = parts_split
    det = make_detector("ckaad", "tiny", dict(TINY, epochs=8))
    det.fit(sp.train_normal, sp.train_anomalies)
    return det, det.predict(sp.test)


def test_ckaad_map_is_higher_inside_the_pasted_defect(fitted):
    det, pred = fitted
    ins, outs = [], []
    for r, m in zip(pred.records, pred.maps):
        if r.mask_path:
            g = read_mask(r.mask_path, m.shape[-1]).astype(bool)
            ins.append(m[g].mean())
            outs.append(m[~g].mean())
    ins, outs = np.array(ins), np.array(outs)
    assert len(ins) == 10 and (ins > outs).mean() >= 0.8 and ins.mean() > outs.mean()
    assert pixel_auroc(pred.records, pred.maps) > 0.75
    labels = np.array([r.label for r in pred.records])
    assert pred.scores[labels == 1].mean() > pred.scores[labels == 0].mean()


def test_ckaad_shapes_and_save_load(fitted, parts_split, tmp_path):
    det, pred = fitted
    n = len(parts_split.test)
    assert pred.maps.shape == (n, 32, 32) and pred.embeddings.shape == (n, 224) and pred.scores.shape == (n,)
    assert tuple(det.backbone_info["layers"]) == (2, 3)
    assert det.anomaly_source == "labelled"
    # score = mean of the top-k smoothed map values (k = 100 * (32/256)^2 -> 2)
    top = np.sort(pred.maps.reshape(n, -1), 1)[:, -2:].mean(1)
    np.testing.assert_allclose(pred.scores, top, rtol=1e-5)
    again = load_detector(det.save(tmp_path / "ckaad.osad"), device="cpu").predict(parts_split.test)
    np.testing.assert_allclose(again.scores, pred.scores, **cross_device_tol(det.device, 1e-5, 1e-6))
    np.testing.assert_allclose(again.maps, pred.maps, **cross_device_tol(det.device, 1e-5, 1e-6))
    np.testing.assert_allclose(again.embeddings, pred.embeddings, **cross_device_tol(det.device, 1e-5, 1e-6))


def test_ckaad_discriminator_learns_only_with_anomalies(parts_split):
    sp = parts_split
    fast = dict(TINY, epochs=1, steps_per_epoch=2)
    plain = make_detector("ckaad", "tiny", dict(fast, elastic_anomalies="never")).fit(sp.train_normal, [])
    fresh = make_detector("ckaad", "tiny", fast)
    seed_everything(fresh.config["seed"])  # the initialisation fit() starts from
    fresh._build(fresh=True)
    for a, b in zip(plain.discs.parameters(), fresh.discs.parameters()):
        torch.testing.assert_close(a, b)  # same seed, never stepped: reconstruction only
    assert plain.anomaly_source == "none"
    elastic = make_detector("ckaad", "tiny", fast).fit(sp.train_normal, [])  # auto: elastic copies
    assert elastic.anomaly_source == "none + elastic copies"
    assert any(not torch.equal(a, b) for a, b in zip(elastic.discs.parameters(), fresh.discs.parameters()))


def test_ckaad_trains_on_masks_where_they_exist(parts_split):
    from dataclasses import replace

    sp = parts_split
    fast = dict(TINY, epochs=1, steps_per_epoch=2, device="cpu")
    with_masks = make_detector("ckaad", "tiny", fast).fit(sp.train_normal, sp.train_anomalies)
    assert with_masks.mask_sources == {"ground_truth": 2, "image_level": 0, "image_level_as": "coarse"}
    labels_only = make_detector("ckaad", "tiny", dict(fast, use_gt_masks=False)).fit(sp.train_normal,
                                                                                     sp.train_anomalies)
    assert labels_only.mask_sources["ground_truth"] == 0
    no_files = [replace(r, mask_path=None) for r in sp.train_anomalies]
    same = make_detector("ckaad", "tiny", fast).fit(sp.train_normal, no_files)
    # no mask anywhere: the paper's loss, bit for bit the same as switching masks off
    for a, b in zip(same.discs.parameters(), labels_only.discs.parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(with_masks.discs.parameters(), labels_only.discs.parameters()))


def test_ckaad_cpu_training_is_repeatable(parts_split):
    sp = parts_split
    fast = dict(TINY, epochs=1, steps_per_epoch=2, device="cpu")  # bitwise: a CPU promise
    a = make_detector("ckaad", "tiny", fast).fit(sp.train_normal, sp.train_anomalies).predict(sp.test[:4]).scores
    b = make_detector("ckaad", "tiny", fast).fit(sp.train_normal, sp.train_anomalies).predict(sp.test[:4]).scores
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_records_how_many_anomalies_trained_with_a_mask(parts_split, tmp_path, monkeypatch):
    """Masks drawn in the app reach training through ``images.mask_path``; the stored run
    says how many labelled anomalies had one."""
    import db
    from db import masks as mq
    from db import queries as q
    from osad_core.experiment import run_experiment
    from osad_core.store import record_run
    from osad_core.worker import project_dataset
    from ui import ingest

    root = parts_split.train_normal[0].path.rsplit("/train/", 1)[0]
    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(root.rsplit("/", 1)[0]))
    db.init_db()
    created = ingest.create_from_folder(root, "parts")
    with db.session_scope() as s:
        holes = [im for im in q.get_images(s, created.project_id) if im.defect_type == "hole"][:2]
        q.set_split(s, [im.id for im in holes], "train", author="t")
        mq.set_mask(s, holes[1].id, None, author="t")  # one labelled anomaly loses its mask
        ds = project_dataset(s, created.project_id)
    assert sum(bool(r.mask_path) for r in ds.records if r.label == 1 and r.split == "train") == 1
    res = run_experiment(ds, Protocol("general", 2, seed=0), "ckaad", "tiny", dict(TINY, epochs=1, steps_per_epoch=1))
    run_id = record_run(res, ds)
    with db.session_scope() as s:
        ms = q.get_run(s, run_id).config_json["mask_sources"]
    assert ms == {"ground_truth": 1, "image_level": 1, "image_level_as": "coarse"}

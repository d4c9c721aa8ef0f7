import numpy as np
import pytest
import torch

from osad_core import augment
from osad_core.losses import deviation_loss
from osad_core.methods import make_detector
from osad_core.methods.drafamily import topk_mean


def test_deviation_loss_on_known_values():
    g = torch.Generator().manual_seed(0)
    # a normal scored at the prior's mean costs ~0; an anomaly at 0 costs ~margin 5
    assert deviation_loss(torch.tensor([0.0]), torch.tensor([0.0]), generator=g).item() < 0.05
    assert deviation_loss(torch.tensor([0.0]), torch.tensor([1.0]), generator=g).item() == pytest.approx(5, abs=0.1)
    # an anomaly beyond the margin costs nothing; a normal at 3 costs |z| ~ 3
    assert deviation_loss(torch.tensor([7.0]), torch.tensor([1.0]), generator=g).item() == 0.0
    assert deviation_loss(torch.tensor([3.0]), torch.tensor([0.0]), generator=g).item() == pytest.approx(3, abs=0.1)
    # batch mean
    both = deviation_loss(torch.tensor([3.0, 7.0]), torch.tensor([0.0, 1.0]), generator=g).item()
    assert both == pytest.approx(1.5, abs=0.1)


def test_topk_mean_uses_ten_percent_of_positions():
    m = torch.zeros(1, 14, 14)
    m.view(-1)[:19] = -2.0  # absolute values count
    m.view(-1)[19] = 100.0
    # k = floor(0.1 * 196) = 19 -> (100 + 18 * 2) / 19
    assert topk_mean(m, 0.1).item() == pytest.approx((100 + 18 * 2) / 19)
    assert topk_mean(torch.ones(2, 7, 7), 0.1).shape == (2,)  # k = 4 at 7x7
    assert topk_mean(torch.arange(4.0).view(1, 2, 2), 0.1).item() == 3.0  # k >= 1


@pytest.mark.parametrize("method,heads", [("devnet", {"seen"}), ("dra", {"normal", "seen", "pseudo", "residual"})])
def test_head_shapes(method, heads):
    det = make_detector(method, "tiny", {"weights": "random", "backbone": "resnet18", "image_size": 64, "device": "cpu"})
    det._build(fresh=True)
    if method == "dra":
        det.ref_images = np.zeros((2, 64, 64, 3), np.uint8)
    det._ref_cache = None
    x = torch.randn(3, 3, 64, 64)
    det.model.eval()
    with torch.no_grad():
        out = det.forward(x, train=False)
    assert {k for k in out if not k.startswith("_")} == heads
    for k in heads:
        assert out[k][0].shape == (3,)
    assert out["seen"][1][0].shape == (3, 2, 2) and out["seen"][1][1].shape == (3, 1, 1)  # 64 px / 32, 32 px / 32
    assert out["_embedding"][0].shape == (3, 512)
    assert det.anomaly_map(out, 16).shape == (3, 16, 16)
    assert det.score(out).shape == (3,)


def test_dra_residual_head_sees_reference_minus_sample():
    det = make_detector("dra", "tiny", {"weights": "random", "backbone": "resnet18", "device": "cpu"})
    det._build(fresh=True)
    seen = {}

    def fake_head(r):
        seen.setdefault("r", r)  # scale 0 is applied first
        return torch.zeros(r.shape[0], *r.shape[2:])

    det.model.heads["residual"].forward = fake_head
    f = [torch.ones(2, 512, 2, 2), torch.ones(2, 512, 1, 1)]
    ref = [torch.full((1, 512, 2, 2), 3.0), torch.full((1, 512, 1, 1), 3.0)]
    det.head_outputs(det.model.heads, f, ref)
    assert torch.allclose(seen["r"], torch.full((2, 512, 2, 2), 2.0))


def test_dra_ref_rotate_rotates_each_reference_in_every_training_batch_and_keeps_test_time_clean():
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    normals[:, 8:24, 12:20] = 255  # an off-centre bar, so every rotation but 0° moves pixels

    def refs(**over):
        det = make_detector("dra", "tiny", {"weights": "random", "backbone": "resnet18", "device": "cpu",
                                            "n_refs": 3, "seed": 5, **over})
        det.prepare_training(normals, normals[:1], np.random.default_rng(5))
        return det

    off, on = refs(), refs(ref_rotate=True)
    clean = augment.test_transform(off.ref_images)
    assert np.array_equal(on.ref_images, off.ref_images)  # the same fixed references either way
    # off (default): training and test time see the clean references, batch after batch
    assert torch.equal(off.reference_batch(train=True), clean) and torch.equal(off.reference_batch(), clean)
    # on: every training batch rotates each reference by its own angle, as the training images are rotated
    g = torch.Generator().manual_seed(on._ref_gen.initial_seed())
    first, second = on.reference_batch(train=True), on.reference_batch(train=True)
    assert torch.equal(first, augment.train_transform(on.ref_images, g))
    assert torch.equal(second, augment.train_transform(on.ref_images, g))  # a fresh draw per batch
    assert not torch.equal(first, second)
    assert all(not torch.equal(first[i], clean[i]) for i in range(3))
    # test time (and the reference features cached for scoring and export) stay clean
    assert torch.equal(on.reference_batch(), clean)
    # the reference stream has its own generator: the training data stream is the same as with it off
    assert refs(ref_rotate=True)._ref_gen.initial_seed() == on._ref_gen.initial_seed()


def test_dra_with_rotated_references_trains_and_scores_deterministically(mvtec_dir):
    from osad_core.data import load_folder
    from osad_core.protocol import Protocol, make_split

    sp = make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=0))
    over = {"weights": "random", "backbone": "resnet18", "device": "cpu", "ref_rotate": True}
    det = make_detector("dra", "tiny", over).fit(sp.train_normal, sp.train_anomalies)
    a = det.predict(sp.test).scores
    np.testing.assert_array_equal(a, det.predict(sp.test).scores)
    base = make_detector("dra", "tiny", {**over, "ref_rotate": False}).fit(sp.train_normal, sp.train_anomalies)
    assert not np.allclose(a, base.predict(sp.test).scores)  # the option reaches training


def test_dra_loss_routes_samples_to_heads():
    det = make_detector("dra", "tiny", {"weights": "random", "backbone": "resnet18"})
    y = torch.tensor([0, 1, 2])
    big = torch.tensor([0.0, 50.0, 50.0])
    out = {"normal": (torch.tensor([50.0, 0.0, 0.0]), None), "seen": (big, None), "pseudo": (big, None),
           "residual": (big, None)}
    # every head is right about every sample it trains on -> loss ~0 (seen ignores pseudo, pseudo ignores seen)
    assert det.loss(out, y).item() < 0.2
    out["seen"] = (torch.tensor([0.0, 50.0, 0.0]), None)  # seen head's view of a pseudo sample is not trained
    assert det.loss(out, y).item() < 0.2


def test_cutmix_changes_one_rectangle_only():
    rng = np.random.default_rng(0)
    img = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    out = augment.cutmix(img, rng)
    diff = np.any(out != img, axis=2)
    ys, xs = np.nonzero(diff)
    assert diff.any()
    box = diff[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.mean() > 0.5  # changed pixels form one compact rectangle
    assert diff.sum() <= 0.15 * 64 * 64 + 64


def test_rotation_fills_corners_with_zero():
    x = torch.ones(4, 3, 32, 32)
    r = augment.random_rotate(x, torch.Generator().manual_seed(0))
    assert r.shape == x.shape and (r == 0).any()


def test_freeze_levels_only_freeze_pretrained_trunks():
    det = make_detector("devnet", "tiny", {"backbone": "efficientnet_lite0", "freeze_levels": 2})
    det._build(fresh=True)
    trunk = det.model.trunk.net
    assert not any(p.requires_grad for p in trunk._blocks[4].parameters())  # end of stride 8
    assert all(p.requires_grad for p in trunk._blocks[5].parameters())
    det = make_detector("devnet", "tiny", {"backbone": "resnet18", "weights": "random", "freeze_levels": 2})
    det._build(fresh=True)
    assert all(p.requires_grad for p in det.model.parameters())  # random weights are always trained

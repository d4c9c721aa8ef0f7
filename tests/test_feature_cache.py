"""The frozen-feature cache: each image's features once, the same values, a size limit; and
CKAAD training from it (the extractor runs once per image, not once per draw)."""
import numpy as np
import pytest
import torch

from osad_core.feature_cache import FrozenFeatureCache
from osad_core.methods import make_detector
from osad_core.protocol import Protocol, make_split
from osad_core.data import load_folder


class Counting:
    """Two 'levels' of features that identify each image; counts the images it was run on."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images: np.ndarray) -> list[torch.Tensor]:
        self.images_seen += len(images)
        x = torch.from_numpy(images.astype(np.float32))
        return [x[:, None].repeat(1, 3, 1, 1), x[:, None, ::2, ::2] * 2]


def _images(n=10, size=4):
    return np.arange(n * size * size, dtype=np.uint8).reshape(n, size, size)


def test_take_returns_the_features_of_the_drawn_images_each_computed_once():
    images, f = _images(), Counting()
    cache = FrozenFeatureCache(images, f, limit_mb=1)
    for idx in ([3, 1, 3], [0, 1, 2, 3, 4], [9, 9, 0], list(range(10))):
        got, want = cache.take(idx), Counting()(images[idx])
        assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert f.images_seen == 10 and cache.have.all()  # 21 drawn, 10 distinct
    assert cache.nbytes == 10 * (3 * 16 + 4) * 4


def test_a_cache_over_its_limit_computes_per_use_with_the_same_values():
    images, f = _images(), Counting()
    cache = FrozenFeatureCache(images, f, limit_mb=10 * 52 * 4 / 2 ** 20 - 1e-6)  # one byte short
    got = cache.take([3, 1, 3])
    assert torch.equal(got[0], Counting()(images[[3, 1, 3]])[0]) and not cache.enabled
    cache.take([3, 1, 3])
    assert f.images_seen == 2 + 3 and cache.nbytes == 0  # the first draw's two, then all three again
    off = FrozenFeatureCache(images, Counting(), limit_mb=0)
    off.take([0, 0])
    assert off.features.images_seen == 2


def test_fill_computes_every_image_in_batches_with_progress():
    from osad_core.train import Callbacks

    seen = []

    class Record(Callbacks):
        def begin(self, stage, total=0, *args, **kw):
            seen.append((stage, total))

        def advance(self, done, *args, **kw):
            seen.append(done)

    images, f = _images(), Counting()
    cache = FrozenFeatureCache(images, f, limit_mb=1)
    cache.fill(4, Record())
    assert seen == [("Normal features", 10), 4, 8, 10] and f.images_seen == 10
    cache.take([5, 6])
    assert f.images_seen == 10


@pytest.fixture(scope="module")
def parts_split(tmp_path_factory):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("cache") / "parts", n_train=6)
    return make_split(load_folder(root), Protocol("general", 2, seed=0))


def test_ckaad_runs_its_extractor_once_per_training_image_and_trains_as_without(parts_split, monkeypatch):
    sp = parts_split
    fast = dict(backbone="efficientnet_lite0", image_size=64, epochs=2, steps_per_epoch=4, device="cpu",
                elastic_anomalies="never")
    runs = {}
    for name, mb in (("cached", 2048), ("fresh", 0)):
        det = make_detector("ckaad", "tiny", dict(fast, feature_cache_mb=mb))
        counted = {"images": 0}
        build = det._build

        def counting_build(fresh, det=det, build=build, counted=counted):
            build(fresh)
            forward = det.extractor.forward

            def f(x, **kw):
                counted["images"] += len(x)
                return forward(x, **kw)
            det.extractor.forward = f
        monkeypatch.setattr(det, "_build", counting_build)
        det.fit(sp.train_normal, sp.train_anomalies)
        runs[name] = (det, counted["images"])
    (cached, n_cached), (fresh, n_fresh) = runs["cached"], runs["fresh"]
    n_img = len(sp.train_normal) + len(sp.train_anomalies)
    assert n_fresh == 2 * 4 * (4 + 2)  # 8 steps of 4 normals and 2 anomalies
    assert n_cached <= n_img < n_fresh
    # the same training up to the last float bit of the features (other batch neighbours)
    np.testing.assert_allclose([h["loss"] for h in cached.history], [h["loss"] for h in fresh.history], rtol=1e-4)
    a, b = cached.predict(sp.test[:4]).scores, fresh.predict(sp.test[:4]).scores
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

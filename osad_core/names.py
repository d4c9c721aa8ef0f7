"""Names of choices (backbones, weights, presets), torch-free, so the command line starts
without importing torch (the ONNX scoring path never imports it)."""
from __future__ import annotations

BACKBONES = ("auto", "resnet18", "wide_resnet50_2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
WEIGHT_CHOICES = ("auto", "imagenet", "random")
PRESETS = ("quick", "paper", "tiny")
# presets only some methods have (the method refuses the others): SaliencyCut's quick14
METHOD_PRESETS = ("quick14",)
# The method the Train page and `train`/`benchmark` use unless told otherwise: Fusion has the
# best image AUROC of the seven in 5 of 6 measured cells (HeadCT 1, ELPV 10 / 1, ELPV hard 10,
# magnetic tile 10; quick preset, 3 seeds) and trains in minutes; BGAD leads on HeadCT 10 by
# 0.006 with Fusion's Lite2 backbone (docs/BENCHMARKS.md, "Fusion against the six detectors").
DEFAULT_METHOD = "fusion"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were demanded but none could be found."""

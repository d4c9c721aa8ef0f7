"""DevNet: one 1x1-conv scoring head, top-K MIL, deviation loss (METHODS.md §1)."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import deviation_loss
from .base import register
from .drafamily import FAMILY_DEFAULTS, DRAFamilyDetector, conv_score_map


@register
class DevNet(DRAFamilyDetector):
    name = "devnet"
    description = "DevNet — one deviation-scored head; simple, fast, strong on the defect types it was shown"
    defaults = dict(
        FAMILY_DEFAULTS,
        epochs=50,
        anomaly_fraction=0.5,  # 24 normal + 24 labelled anomalies
        pseudo_prob=0.0,  # DevNet uses no pseudo anomalies
        lr_step_at_epoch_start=False,  # StepLR stepped after each epoch
    )
    presets = {
        "paper": {},
        # see README "Presets": small images, a partly frozen pretrained trunk, fewer steps
        "quick": dict(image_size=160, epochs=10, steps_per_epoch=10, batch_size=32, lr_step_epochs=8,
                      freeze_levels=2),
        "tiny": dict(image_size=64, epochs=2, steps_per_epoch=3, batch_size=8, lr_step_epochs=10, map_size=32),
    }
    map_heads = ("seen",)
    needs_anomalies = True

    def make_heads(self, channels: int) -> nn.Module:
        return nn.ModuleDict({"seen": nn.Conv2d(channels, 1, 1)})

    def head_outputs(self, heads, feats, ref_feats):
        return {"seen": conv_score_map(heads["seen"], feats, self.config["topk"])}

    def loss(self, out, y):
        return deviation_loss(out["seen"][0], (y == 1).float())

    def score(self, out) -> torch.Tensor:
        return out["seen"][0]

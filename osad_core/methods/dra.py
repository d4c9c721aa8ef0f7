"""DRA: seen, pseudo, latent-residual and normality heads on one backbone (METHODS.md §2).

Reference set (the residual head's M_r): one fixed set of ``n_refs`` clean normal training
images chosen with the run seed, used in training and at test time (the paper's choice).
``ref_rotate=True`` rotates those references in every training batch, each by its own
uniform angle in [-180°, 180°] like the training images, as the official code's reference
loader does (it applies the training pipeline to them); test time keeps them clean. The
code's other differences (references re-drawn for every batch, test time included, and a
CutMix pseudo anomaly with probability 0.5) are not reproduced: they make test scores
random.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import augment
from ..losses import deviation_loss
from .base import register
from .drafamily import FAMILY_DEFAULTS, DRAFamilyDetector, conv_score_map, topk_mean


class ResidualHead(nn.Module):
    """g_r: 3x3 conv C->C, BatchNorm, ReLU, 1x1 conv C->1 on (reference map - sample map)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.score = nn.Conv2d(c, 1, 1)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(residual))[:, 0]


class NormalityHead(nn.Module):
    """g_n: global average pool, Linear C->256, ReLU, Linear 256->1, absolute value."""

    def __init__(self, c: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp(f.mean(dim=(2, 3)))[:, 0].abs()


@register
class DRA(DRAFamilyDetector):
    name = "dra"
    description = "DRA — seen, pseudo and residual abnormality heads; generalises to unseen defect types"
    defaults = dict(FAMILY_DEFAULTS, n_refs=5,
                    ref_rotate=False)  # rotate the references with every training batch (official code)
    presets = {
        "paper": {},
        "quick": dict(image_size=160, epochs=10, steps_per_epoch=10, batch_size=32, lr_step_epochs=8,
                      freeze_levels=2),
        "tiny": dict(image_size=64, epochs=2, steps_per_epoch=3, batch_size=9, lr_step_epochs=10, map_size=32,
                     n_refs=2),
    }
    map_heads = ("seen", "pseudo", "residual")

    def make_heads(self, channels: int) -> nn.Module:
        return nn.ModuleDict({
            "normal": NormalityHead(channels),
            "seen": nn.Conv2d(channels, 1, 1),
            "pseudo": nn.Conv2d(channels, 1, 1),
            "residual": ResidualHead(channels),
        })

    def prepare_training(self, normals, anomalies, rng):
        # One fixed, clean reference set chosen with the run seed (the paper's choice; the
        # official code redraws augmented references per batch, also at test time).
        n = min(self.config["n_refs"], len(normals))
        idx = np.sort(rng.choice(len(normals), size=n, replace=False))
        self.ref_images = np.ascontiguousarray(normals[idx])
        self.ref_indices = idx.tolist()
        # its own generator: with ref_rotate off the data stream is exactly as before
        self._ref_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.config["seed"], 3])
                                                          .generate_state(1)[0]))

    def extra_train_state(self) -> dict:
        return {"ref_gen": self._ref_gen.get_state()}

    def load_extra_train_state(self, state: dict) -> None:
        if "ref_gen" in state:
            self._ref_gen.set_state(state["ref_gen"])

    def reference_batch(self, train=False):
        if train and self.config["ref_rotate"]:
            return augment.train_transform(self.ref_images, self._ref_gen)
        return augment.test_transform(self.ref_images)

    def head_outputs(self, heads, feats, ref_feats):
        k = self.config["topk"]
        res_maps = [heads["residual"](r - f) for r, f in zip(ref_feats, feats)]
        return {
            "normal": (torch.stack([heads["normal"](f) for f in feats]).mean(0), None),
            "seen": conv_score_map(heads["seen"], feats, k),
            "pseudo": conv_score_map(heads["pseudo"], feats, k),
            "residual": (torch.stack([topk_mean(m, k) for m in res_maps]).mean(0), res_maps),
        }

    def loss(self, out, y):
        sp = y != 2  # normals and seen anomalies
        pp = y != 1  # normals and pseudo anomalies
        return (
            deviation_loss(out["normal"][0], (y == 0).float())
            + deviation_loss(out["seen"][0][sp], (y[sp] == 1).float())
            + deviation_loss(out["pseudo"][0][pp], (y[pp] == 2).float())
            + deviation_loss(out["residual"][0], (y != 0).float())
        )

    def score(self, out):
        return -out["normal"][0] + out["seen"][0] + out["pseudo"][0] + out["residual"][0]

    def state(self):
        s = super().state()
        s["ref_images"] = self.ref_images
        s["ref_indices"] = self.ref_indices
        return s

    def load_state(self, state):
        self.ref_images = state["ref_images"]
        self.ref_indices = state.get("ref_indices")
        super().load_state(state)

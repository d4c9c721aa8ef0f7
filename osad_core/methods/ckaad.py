"""CKAAD: coarse-knowledge-aware adversarial learning (METHODS.md §6).

A feature-reconstruction auto-encoder G over frozen pretrained multi-scale features
(cosine reconstruction loss on normals) and, per feature level, an energy-based patch
discriminator D trained to give low energy to normal patch features and high energy
(hinge at margin a) to reconstructed features and to *every* patch of a labelled
anomalous image — the "coarse" image-level knowledge. Updates alternate: one D step,
then one G step on reconstruction plus λ times the energy D gives G's outputs, so G
learns to output normal-looking features and stops reconstructing anomalies.

Map: Σ_levels up(1 − cos(F, G(F))) per position (bilinear, align corners), Gaussian
smoothed; image score: mean of the top-k map values. σ = 4 px and k = 100 are the paper's
values at a 256-px map and scale with ``map_size`` (σ with the side, k with the area).

Variants: ``generator_loss`` "paper" (λ·γ·E[D(G(·))], eq. 13's only term that depends on
G) or "code" (λ·E[D(G(·))], the same gradient up to γ). ``elastic_anomalies``: the
industrial recipe's elastically deformed normal copies as anomalies — "auto" uses them only
when no labelled anomaly is given (the code then trains on reconstruction alone, "never").
Our addition: the frozen features of the normals and the labelled anomalies (never
augmented) are computed once per image and kept (``feature_cache_mb``), not once per draw.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from .. import augment
from ..backbones import multiscale_for
from ..data import IMAGE_CACHE, DataError, read_mask
from ..feature_cache import FrozenFeatureCache
from ..smoothing import resize_maps
from ..train import Callbacks, InfiniteStream, describe_device, resolve_device, run_loop, seed_everything
from .base import Detector, Prediction, register

log = logging.getLogger(__name__)

GENERATOR_LOSSES = ("paper", "code")
ELASTIC_MODES = ("auto", "always", "never")
AE_BLOCKS = ("auto", "basic", "bottleneck")


# --------------------------------------------------------------------------------------
# auto-encoder (InstanceNorm with affine parameters everywhere)
# --------------------------------------------------------------------------------------
def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c, affine=True)


class _Block(nn.Module):
    """Residual block, basic (two 3×3) or bottleneck (1×1, 3×3, 1×1 with width = out/2).

    ``resample``: 1 keeps the size, 2 halves it (stride-2 conv), -2 doubles it (2×2
    transposed conv in the main path and the shortcut).
    """

    def __init__(self, cin: int, cout: int, kind: str, resample: int = 1):
        super().__init__()

        def spatial(a: int, b: int) -> nn.Module:
            if resample == -2:
                return nn.ConvTranspose2d(a, b, 2, 2, bias=False)
            return nn.Conv2d(a, b, 3, 2 if resample == 2 else 1, 1, bias=False)

        if kind == "basic":
            self.body = nn.Sequential(spatial(cin, cout), _norm(cout), nn.ReLU(inplace=True),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout))
        else:
            w = max(1, cout // 2)
            self.body = nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), _norm(w), nn.ReLU(inplace=True),
                                      spatial(w, w), _norm(w), nn.ReLU(inplace=True),
                                      nn.Conv2d(w, cout, 1, bias=False), _norm(cout))
        if resample == -2:
            self.short = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), _norm(cout))
        elif resample == 2 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, 2 if resample == 2 else 1, bias=False), _norm(cout))
        else:
            self.short = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class FeatureAutoEncoder(nn.Module):
    """G of §6.2 for selected levels of consecutive strides (shallow first).

    Encoder: each shallower map goes through stride-2 3×3 convs (IN, ReLU), each to the
    channels of the next level, until it matches the deepest map; concatenate; one residual
    stage with stride 2 → code z (2× the deepest channels). Decoder: one up-sampling stage per
    level, deepest first, each ending at that level's channels and size.
    """

    def __init__(self, layer_channels: list[int], level_channels: list[int], layers: list[int], kind: str,
                 enc_blocks: int, dec_blocks: list[int]):
        super().__init__()
        if any(b - a != 1 for a, b in zip(layers, layers[1:])):
            raise ValueError(f"CKAAD needs consecutive feature levels, got {layers}")
        deep = layer_channels[-1]
        self.down = nn.ModuleList()
        for lv in layers[:-1]:
            convs, cin = [], level_channels[lv - 1]
            for nxt in range(lv + 1, layers[-1] + 1):
                cout = level_channels[nxt - 1]
                convs += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), _norm(cout), nn.ReLU(inplace=True)]
                cin = cout
            self.down.append(nn.Sequential(*convs))
        cat = deep * len(layers)
        self.z_channels = 2 * deep
        self.bottleneck = nn.Sequential(*[_Block(cat if i == 0 else self.z_channels, self.z_channels, kind,
                                                 2 if i == 0 else 1) for i in range(enc_blocks)])
        self.up = nn.ModuleList()
        cin = self.z_channels
        for cout, n in zip(reversed(layer_channels), dec_blocks):
            self.up.append(nn.Sequential(*[_Block(cin if i == 0 else cout, cout, kind, -2 if i == 0 else 1)
                                           for i in range(n)]))
            cin = cout
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.InstanceNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        parts = [d(f) for d, f in zip(self.down, feats[:-1])] + [feats[-1]]
        return self.bottleneck(torch.cat(parts, 1))

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs, x = [], z
        for stage in self.up:
            x = stage(x)
            outs.append(x)
        return outs[::-1]  # shallow first, like the inputs

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        z = self.encode(feats)
        return self.decode(z), z


class PatchDiscriminator(nn.Module):
    """Energy per position: L2-normalise over channels, 1×1 c→c (no bias), LeakyReLU 0.1,
    1×1 c→c, LeakyReLU 0.1, 1×1 c→1; E = |output| ≥ 0, shape (B, h, w)."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.LeakyReLU(0.1),
                                 nn.Conv2d(c, c, 1), nn.LeakyReLU(0.1), nn.Conv2d(c, 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(F.normalize(f, dim=1))[:, 0].abs()


# --------------------------------------------------------------------------------------
# losses (per-level lists; means over batch and positions, summed over levels)
# --------------------------------------------------------------------------------------
def real_energy(energies: list[torch.Tensor]) -> torch.Tensor:
    """T(X) = mean E(X), summed over levels."""
    return sum(e.mean() for e in energies)


def fake_hinge(energies: list[torch.Tensor], margin: float = 5.0) -> torch.Tensor:
    """Fk(X) = mean max(0, a − E(X)), summed over levels."""
    return sum(F.relu(margin - e).mean() for e in energies)


def masked_fake_hinge(energies: list[torch.Tensor], masks: torch.Tensor | None, margin: float = 5.0
                      ) -> torch.Tensor:
    """Fk over the positions a defect mask covers (``masks`` (B, 1, S, S), 1 = defect,
    all ones for an image known only by its label); other positions take no part."""
    if masks is None:
        return fake_hinge(energies, margin)
    total = 0.0
    for e in energies:
        w = F.adaptive_max_pool2d(masks, e.shape[-2:])[:, 0]  # a cell counts when any of its pixels is defect
        total = total + (F.relu(margin - e) * w).sum() / w.sum().clamp_min(1.0)
    return total


def discriminator_loss(e_normal, e_anomalous, e_recon, margin: float = 5.0, gamma: float = 0.5,
                       anomaly_masks: torch.Tensor | None = None) -> torch.Tensor:
    """L_D = T(F⁺) + (1 − γ)·Fk(F⁻) + γ·Fk(G(F⁺) ∪ G(F⁻)) (reconstructions detached by the caller).

    With ``anomaly_masks`` the anomalies' term covers their masked positions only."""
    return (real_energy(e_normal) + (1 - gamma) * masked_fake_hinge(e_anomalous, anomaly_masks, margin)
            + gamma * fake_hinge(e_recon, margin))


def cosine_reconstruction_loss(feats: list[torch.Tensor], recs: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels mean over images of 1 − cos(vec F̃, vec F) (whole flattened map per image)."""
    return sum((1 - F.cosine_similarity(r.flatten(1), f.flatten(1), dim=1)).mean() for f, r in zip(feats, recs))


def cosine_map(feats: list[torch.Tensor], recs: list[torch.Tensor], size: int) -> torch.Tensor:
    """Σ_levels up(1 − cos(F(h,w), F̃(h,w))), bilinear with aligned corners, (B, size, size).

    The cosine as ``F.cosine_similarity`` defines it (each norm floored at 1e-8) from three
    channel sums: its own kernel took 6× as long on these maps (4.6 against 0.7 ms for 32
    images at 128 px)."""
    total = 0.0
    for f, r in zip(feats, recs):
        norms = (f * f).sum(1).sqrt().clamp_min(1e-8) * (r * r).sum(1).sqrt().clamp_min(1e-8)
        total = total + resize_maps(1 - (f * r).sum(1) / norms, size, align_corners=True)
    return total


def topk_pixel_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    flat = maps.flatten(1)
    return flat.topk(min(max(1, k), flat.shape[1]), dim=1).values.mean(1)


@register
class CKAAD(Detector):
    name = "ckaad"
    description = "CKAAD — feature reconstruction with an energy discriminator; smooth pixel maps from image labels"
    defaults = dict(
        image_size=256,
        map_size=256,
        backbone="auto",
        weights="auto",
        weights_path=None,
        layers=(2, 3),  # medical configuration (ResNet-18 layers 2, 3); industrial: (1, 2, 3) with WRN-50
        ae_block="auto",  # bottleneck for Wide-ResNet-50-2, basic otherwise
        enc_blocks=None,  # None: 2 basic / 3 bottleneck
        dec_blocks=None,  # per level, deepest first; None: 2 each (basic) / 3, 4, 6 (bottleneck)
        epochs=200,
        steps_per_epoch=None,  # None: one pass over the normal images (last incomplete batch dropped)
        batch_size=32,
        lr=1e-3,  # auto-encoder (medical; industrial 5e-3)
        lr_d=1e-4,
        adam_beta1=0.5,
        d_grad_clip=1.0,
        margin=5.0,
        gamma=0.5,
        lam=0.02,
        generator_loss="paper",
        use_gt_masks=True,  # an anomaly with a defect mask: D's anomaly term on the masked positions only
        elastic_anomalies="auto",
        elastic_alpha=200.0,  # at 256 px; scaled with the image size
        elastic_sigma=5.0,
        smooth_sigma=4.0,  # px at a 256-px map
        topk_pixels=100,  # at a 256-px map
        device="auto",
        seed=111,
        test_batch_size=32,
        feature_cache_mb=2048,  # keep the un-augmented training images' frozen features up to this size (0 = never)
    )
    presets = {
        "paper": {},
        "quick": dict(image_size=128, map_size=64, epochs=10, steps_per_epoch=20, batch_size=16),
        "tiny": dict(image_size=64, map_size=32, epochs=2, steps_per_epoch=3, batch_size=4, test_batch_size=8),
    }
    preset_notes = {
        "paper": "256 px, 200 passes over the normals (minutes on a GPU, hours on a CPU for ELPV)",
        "quick": "128 px, 10 epochs of 20 batches of 16, 64 px maps",
        "tiny": "smoke tests only: 64 px",
    }

    choices = {"generator_loss": GENERATOR_LOSSES, "elastic_anomalies": ELASTIC_MODES, "ae_block": AE_BLOCKS}
    stage = "Training"  # the progress stage its training reports (Fusion's reconstruction part names its own)

    def __init__(self, preset: str = "quick", overrides: dict | None = None):
        super().__init__(preset, overrides)
        self.config["layers"] = tuple(int(v) for v in self.config["layers"])

    # -- model ---------------------------------------------------------------------------
    def _build(self, fresh: bool) -> None:
        c = self.config
        self.extractor, self.backbone_info = multiscale_for(c, self.backbone_info, fresh)
        bi = self.backbone_info
        kind = c["ae_block"]
        if kind == "auto":
            kind = "bottleneck" if bi["name"] == "Wide-ResNet-50-2" else "basic"
        n = len(bi["layers"])
        enc = c["enc_blocks"] or (3 if kind == "bottleneck" else 2)
        dec = list(c["dec_blocks"] or ([3, 4, 6, 6][:n] if kind == "bottleneck" else [2] * n))
        if len(dec) != n:
            raise ValueError(f"dec_blocks needs one count per level ({n}), got {dec}")
        self.ae = FeatureAutoEncoder(list(bi["layer_channels"]), list(bi["level_channels"]), list(bi["layers"]),
                                     kind, enc, dec)
        self.discs = nn.ModuleList(PatchDiscriminator(ch) for ch in bi["layer_channels"])
        self.device = resolve_device(c["device"])
        self.device_name = describe_device(self.device)
        for m in (self.extractor, self.ae, self.discs):
            m.to(self.device)

    def _features(self, images: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        x = images if isinstance(images, torch.Tensor) else augment.test_transform(images)
        return self.extractor(x.to(self.device))

    def _elastic(self, images: np.ndarray) -> torch.Tensor:
        """Elastically deformed copies (CKAAD's industrial pseudo anomalies), normalised."""
        from torchvision.transforms import v2

        c = self.config
        tf = v2.ElasticTransform(alpha=c["elastic_alpha"] * c["image_size"] / 256, sigma=c["elastic_sigma"])
        x = augment.to_tensor(images)
        return augment.normalize(torch.stack([tf(im) for im in x]))

    # -- training ------------------------------------------------------------------------
    def fit(self, train_normal, train_anomalies, callbacks: Callbacks | None = None):
        c = self.config
        seed_everything(c["seed"])
        S = c["image_size"]
        normals, _, bad_n = IMAGE_CACHE.load_many(train_normal, S)
        anomalies, ok_an, bad_a = IMAGE_CACHE.load_many(train_anomalies, S)
        self.skipped_train = bad_n + bad_a
        if len(normals) == 0:
            raise DataError("no readable normal training images")
        self._build(fresh=True)
        rng = np.random.default_rng(c["seed"])
        B = min(c["batch_size"], len(normals))
        steps = c["steps_per_epoch"] or max(1, len(normals) // B)
        use_elastic = c["elastic_anomalies"] == "always" or (c["elastic_anomalies"] == "auto" and not len(anomalies))
        self.anomaly_source = ("labelled" if len(anomalies) else "none") + (" + elastic copies" if use_elastic else "")
        an_masks, n_gt = self._anomaly_masks(ok_an, S)
        self.mask_sources = {"ground_truth": n_gt, "image_level": len(ok_an) - n_gt, "image_level_as": "coarse"}
        # normals and labelled anomalies are never augmented: each one's frozen features once
        cache_n = FrozenFeatureCache(normals, self._features, c["feature_cache_mb"])
        cache_a = FrozenFeatureCache(anomalies, self._features, c["feature_cache_mb"])
        s_norm = InfiniteStream(len(normals), rng)
        s_an = InfiniteStream(max(1, len(anomalies)), rng)
        n_an = min(B, len(anomalies))
        betas = (c["adam_beta1"], 0.999)
        opt_g = torch.optim.Adam(self.ae.parameters(), lr=c["lr"], betas=betas)
        opt_d = torch.optim.Adam(self.discs.parameters(), lr=c["lr_d"], betas=betas)
        adv_weight = c["lam"] * (c["gamma"] if c["generator_loss"] == "paper" else 1.0)

        def energies(feats: list[torch.Tensor]) -> list[torch.Tensor]:
            return [d(f) for d, f in zip(self.discs, feats)]

        def step(epoch: int, it: int) -> float:
            self.ae.train()
            self.discs.train()
            i_norm = s_norm.take(B)
            f_pos = cache_n.take(i_norm)
            anom_parts, mask_parts = [], []
            if n_an:
                idx = s_an.take(n_an)
                anom_parts.append(cache_a.take(idx))
                mask_parts.append(an_masks[idx])
            if use_elastic:
                anom_parts.append(self._features(self._elastic(normals[i_norm])))
                mask_parts.append(np.ones((len(i_norm), S, S), np.float32))
            m_neg = None
            if n_gt:  # without any mask the loss is exactly the paper's (every position)
                m_neg = torch.from_numpy(np.concatenate(mask_parts))[:, None].to(self.device)
            f_neg = [torch.cat(p) for p in zip(*anom_parts)] if anom_parts else None
            f_all = [torch.cat([a, b]) for a, b in zip(f_pos, f_neg)] if f_neg else f_pos
            recs, _ = self.ae(f_all)
            if f_neg is not None:
                # (2) one discriminator step: normal low energy, anomalies and reconstructions high
                for p in self.discs.parameters():
                    p.requires_grad_(True)
                l_d = discriminator_loss(energies(f_pos), energies(f_neg), energies([r.detach() for r in recs]),
                                         c["margin"], c["gamma"], anomaly_masks=m_neg)
                opt_d.zero_grad(set_to_none=True)
                l_d.backward()
                if c["d_grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(self.discs.parameters(), c["d_grad_clip"])
                opt_d.step()
            # (3)-(4) auto-encoder step: reconstruct normals, look normal to the updated D
            loss = cosine_reconstruction_loss(f_pos, [r[:B] for r in recs])
            if f_neg is not None:
                for p in self.discs.parameters():
                    p.requires_grad_(False)  # D is fixed during G's step
                loss = loss + adv_weight * real_energy(energies(recs))
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            for p in self.discs.parameters():
                p.requires_grad_(True)
            return loss.item()

        t0 = time.monotonic()
        self.history = run_loop(step, c["epochs"], steps, self.progress_callbacks(callbacks), stage=self.stage)
        self.train_seconds = time.monotonic() - t0
        self.fitted = True
        return self

    def _anomaly_masks(self, records, size: int) -> tuple[np.ndarray, int]:
        """(N, S, S) float masks of the labelled anomalies (all ones where only the label is
        known) and how many came from a mask file."""
        out, n = np.ones((len(records), size, size), np.float32), 0
        for i, r in enumerate(records):
            if self.config["use_gt_masks"] and r.mask_path:
                try:
                    m = read_mask(r.mask_path, size)
                except DataError as exc:
                    log.warning("mask %s unreadable (%s); using the image label only", r.mask_path, exc)
                    continue
                if m.any():
                    out[i], n = m.astype(np.float32), n + 1
        return out, n

    # -- inference -----------------------------------------------------------------------
    def smoothing_sigma(self) -> float:
        return self.config["smooth_sigma"] * self.config["map_size"] / 256

    def topk(self) -> int:
        return max(1, int(round(self.config["topk_pixels"] * (self.config["map_size"] / 256) ** 2)))

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> Prediction:
        if not self.fitted:
            raise RuntimeError("fit or load the detector before predicting")
        self.ae.eval()
        S = self.config["map_size"]
        sigma = self.smoothing_sigma()
        maps, embs = [], []
        for i in range(0, len(images), batch_size):
            feats = self._features(images[i:i + batch_size])
            recs, z = self.ae(feats)
            m = cosine_map(feats, recs, S).float().cpu().numpy()
            if sigma > 0:
                m = np.stack([gaussian_filter(a, sigma, truncate=4.0) for a in m])  # scipy's default truncation
            maps.append(m.astype(np.float32))
            embs.append(z.mean(dim=(2, 3)).float().cpu().numpy())
        maps = np.concatenate(maps) if maps else np.zeros((0, S, S), np.float32)
        scores = topk_pixel_mean(torch.from_numpy(maps), self.topk()).numpy() if len(maps) else np.zeros(0, np.float32)
        return Prediction(scores, maps, np.concatenate(embs) if embs else np.zeros((0, self.ae.z_channels), np.float32),
                          f"global average pool of the auto-encoder code z ({self.ae.z_channels}-d)")

    # -- ONNX export (osad_core.export) --------------------------------------------------
    def prepare_export(self) -> None:
        self.extractor.eval()
        self.ae.eval()

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (scores, maps), as :meth:`predict_arrays` computes them
        (SciPy's smoothing as convolutions in the graph)."""
        from ..smoothing import gaussian_blur

        feats = self._features(x)
        recs, _ = self.ae(feats)
        m = gaussian_blur(cosine_map(feats, recs, self.config["map_size"]).float(), self.smoothing_sigma())
        return topk_pixel_mean(m, self.topk()), m

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "ae": {k: v.cpu() for k, v in self.ae.state_dict().items()},
            "discs": {k: v.cpu() for k, v in self.discs.state_dict().items()},
            "extractor": {k: v.cpu() for k, v in self.extractor.state_dict().items()},
            "anomaly_source": getattr(self, "anomaly_source", None),
            "mask_sources": getattr(self, "mask_sources", None),
        }

    def load_state(self, state: dict) -> None:
        self._build(fresh=False)
        self.extractor.load_state_dict(state["extractor"])
        self.ae.load_state_dict(state["ae"])
        self.discs.load_state_dict(state["discs"])
        self.anomaly_source = state.get("anomaly_source")
        self.mask_sources = state.get("mask_sources")

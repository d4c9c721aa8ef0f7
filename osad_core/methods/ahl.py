"""AHL: anomaly heterogeneity learning on top of DRA or DevNet (METHODS.md §3).

AHL does not train end to end; one ``fit`` runs three stages:

A. **Base model.** Train the base detector (``base`` = "dra" or "devnet") with its own
   recipe and preset.
B. **Feature cache.** With the trained backbone frozen (eval mode, test transform), cache
   the two-scale layer-4 maps once per run, on the training device when it is a GPU:
   every clean normal, every labelled anomaly, and one pseudo-anomalous copy of every
   normal per generator (inter-image CutMix G3, CutPaste G2, DRAEM-style Perlin mask G4
   with procedural textures, see ``augment``).
C. **AHL heads** on the cache only:
   - HADG: k-means (C clusters) of the normal maps; T episodes, each a support set and an
     open-set query set with normals of two different clusters, disjoint labelled
     anomalies (the single one in both when M = 1) and pseudo anomalies from two
     different generators.
   - CDL: per episode a base model starts from the unified heads, takes one
     differentiable gradient step on a support batch and then adapts on further support
     batches; its query loss, weighted by w_i, is back-propagated to the unified heads
     (second order through the first step), which Adam updates once per epoch.
   - ψ: a bidirectional LSTM over the last K epochs of the T base models' query scores,
     trained self-supervised to predict the next epoch's scores; its predictions give
     each base model's generalisation error r_i and w = softmax(-r).

Inference uses the unified heads only: stage-A backbone -> unified heads -> the base
model's score formula, anomaly map (§2.4 / §1) and embedding (GAP of the scale-0 map).
The stage-A base model's own score on the same features is kept in ``extra["base_score"]``
so one run compares AHL with its base on identical features.

Defaults are the paper's intent with the spec's bugs fixed; the official code's variants
are settings (``cluster_membership="prefix"``, ``anomaly_split="code"``,
``episode_generators="same"``, ``inner_optimizer="sgd"``, ``loss_weighting="code"``,
``psi_error="code"``, ``psi_head="code"``, ``head_variant="code"``, ``pseudo_rotate``).
Choices beyond both sources, each a setting:
- ``psi_score_scale="margin"``: ψ reads scores in units of the deviation margin and r_i uses
  them clipped to [0, 1]; with raw deviation scores ("raw", paper and code) a confidently
  scored anomaly (≥ 5) would count as a larger error (ŝ - 1)² than a missed one.
- ``pseudo_rotate=False``: every cached image gets the test transform; the code rotates only
  its offline pseudo anomalies, so black rotation corners would give them away.
- The outer Adam step is taken at the end of each epoch (the code applies it at the start
  of the next one, so its last gradient is never used); ψ runs in eval mode for its
  predictions and starts from zero states (the code draws random states at every call).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import augment
from ..data import IMAGE_CACHE, DataError
from ..losses import DEV_MARGIN, deviation_loss
from ..train import Callbacks, InfiniteStream, run_loop, seed_everything
from .base import REGISTRY, Detector, Prediction, make_detector, register

log = logging.getLogger(__name__)

GENERATORS = ("cutmix", "cutpaste", "draem")  # G3, G2, G4 of METHODS.md §0.6

# Settings handed on to the base model, so both stages share one backbone and pipeline.
SHARED_WITH_BASE = ("image_size", "n_scales", "topk", "backbone", "weights", "weights_path", "device", "seed",
                    "map_size", "test_batch_size")

AHL_DEFAULTS = dict(
    base="dra",  # "dra" | "devnet"
    base_preset=None,  # None: the AHL preset's name
    base_overrides={},  # further base-model settings, e.g. {"epochs": 5}
    # shared with the base model
    image_size=448,
    n_scales=2,
    topk=0.1,
    backbone="auto",
    weights="auto",
    weights_path=None,
    device="auto",
    seed=42,
    map_size=64,
    test_batch_size=32,
    # stage B: feature cache
    cache_batch_size=32,
    cache_on_device=True,  # keep the cache on the GPU when training there
    generators=list(GENERATORS),
    draem_textures=8,  # procedural textures generated per run (1 = the code's single DTD texture)
    pseudo_rotate=False,  # code: rotate cached pseudo anomalies (G2/G3 ±180°, G4 p=0.3 ±90°), clean ones not
    # stage C: HADG
    n_clusters=3,
    n_episodes=6,  # T; ordered pairs of distinct clusters, cycled (6 = all pairs of 3 clusters)
    min_cluster_size=3,  # smaller k-means clusters are dropped (code: <= 2 members)
    kmeans_n_init=10,
    cluster_membership="kmeans",  # | "prefix": the code's bug (first |c| files of the list)
    anomaly_split="disjoint",  # | "code": independent halves, query = other half + 2 of the support half
    episode_generators="different",  # paper: support and query use two generators | "same" (code)
    pseudo_prob=0.5,  # chance a normal of a set is replaced by its cached pseudo anomaly
    # stage C: CDL
    epochs=30,
    steps_per_epoch=20,  # batches per pass over a support / query set
    batch_size=48,  # 16 normal / 16 pseudo / 16 labelled anomalies
    inner_passes=2,  # adaptation passes after the first (differentiable) step: 1 + 2 x 20 steps
    inner_lr=2e-4,  # α, the base models' learning rate
    inner_optimizer="adam",  # paper: base models trained at lr 2e-4 (Adam) | "sgd": the code's plain steps
    lr=2e-3,  # α_g, Adam on the unified heads
    weight_decay=1e-4,
    lr_step_epochs=10,
    lr_gamma=0.1,
    grad_clip=1.0,
    loss_weighting="paper",  # Σ w_i Lq_i (w sums to 1) | "code": Σ (0.5 + 0.5 w_i) Lq_i
    heads_init="fresh",  # Kaiming-normal heads (code) | "base": start from the stage-A heads
    head_variant="dra",  # the base model's heads (paper) | "code": AHL code's DRA heads (§3.2)
    composite_scale_init=1.0,  # head_variant="code" only; 0 reproduces the code's constant composite head
    # stage C: ψ
    use_psi=True,  # False: equal weights 1/T (the ablation "HADG + CDL without ψ")
    psi_seq_len=5,  # K
    psi_hidden=6,
    psi_layers=2,
    psi_dropout=0.5,
    psi_head="paper",  # BiLSTM -> FC 12 hidden -> T | "code": BiLSTM -> ReLU -> Linear 12 -> T
    psi_lr=2e-3,
    psi_weight_decay=1e-3,
    psi_warmup_epochs=2,  # weights from epoch K + warmup on (code: 7 = 5 + 2)
    psi_error="paper",  # r_i over D \ X_n,i with c_j (paper) | "code": 0.5 E_n + 0.5 E_p + 1.0 E_a
    psi_score_scale="margin",  # scores in units of the deviation margin, clipped to [0, 1] for r_i | "raw"
    psi_samples_per_set=0,  # query samples per episode scored for ψ (0 = all; labelled anomalies always)
)


# settings with a fixed set of values: the first is the default (paper / fixed), the others the code's
CHOICES = dict(
    base=("dra", "devnet"),
    cluster_membership=("kmeans", "prefix"),
    anomaly_split=("disjoint", "code"),
    episode_generators=("different", "same"),
    inner_optimizer=("adam", "sgd"),
    loss_weighting=("paper", "code"),
    heads_init=("fresh", "base"),
    head_variant=("dra", "code"),
    psi_head=("paper", "code"),
    psi_error=("paper", "code"),
    psi_score_scale=("margin", "raw"),
)


# --------------------------------------------------------------------------------------
# HADG: heterogeneous anomaly distribution generation (§3.3)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheLayout:
    """Rows of the feature cache: [normals | labelled anomalies | pseudo per generator]."""

    n_normal: int
    n_anomaly: int
    generators: tuple[str, ...]

    @property
    def n_rows(self) -> int:
        return self.n_normal * (1 + len(self.generators)) + self.n_anomaly

    def normal(self, i):
        return np.asarray(i)

    def anomaly(self, j):
        return self.n_normal + np.asarray(j)

    def pseudo(self, g: int, i):
        return self.n_normal + self.n_anomaly + g * self.n_normal + np.asarray(i)

    def image_of(self, row: int) -> tuple[str, int, int | None]:
        """(kind, image index, generator index) of a cache row; kind normal | anomaly | pseudo."""
        row = int(row)
        if row < self.n_normal:
            return "normal", row, None
        if row < self.n_normal + self.n_anomaly:
            return "anomaly", row - self.n_normal, None
        r = row - self.n_normal - self.n_anomaly
        return "pseudo", r % self.n_normal, r // self.n_normal


@dataclass
class EpisodeSet:
    rows: np.ndarray  # cache rows
    labels: np.ndarray  # 0 normal, 1 labelled anomaly, 2 pseudo anomaly
    cluster: int
    generator: int | None

    def kinds(self) -> dict[int, np.ndarray]:
        return {k: np.flatnonzero(self.labels == k) for k in (0, 1, 2) if (self.labels == k).any()}


@dataclass
class Episode:
    support: EpisodeSet
    query: EpisodeSet


@dataclass
class HADGInfo:
    cluster_sizes: list[int] = field(default_factory=list)
    kept_clusters: list[int] = field(default_factory=list)
    fallback: str | None = None
    episodes: list[dict] = field(default_factory=list)


def cluster_normals(feats: np.ndarray, n_clusters: int, seed: int, n_init: int = 10) -> np.ndarray:
    """k-means cluster label of every normal (rows of flattened scale-0 maps)."""
    from sklearn.cluster import KMeans

    k = max(1, min(n_clusters, len(feats)))
    if k == 1:
        return np.zeros(len(feats), np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    return km.fit_predict(feats.reshape(len(feats), -1).astype(np.float32)).astype(np.int64)


def build_episodes(cluster_labels: np.ndarray, layout: CacheLayout, rng: np.random.Generator, *,
                   n_episodes: int = 6, min_cluster_size: int = 3, membership: str = "kmeans",
                   anomaly_split: str = "disjoint", generators: str = "different",
                   pseudo_prob: float = 0.5) -> tuple[list[Episode], HADGInfo]:
    """The T simulated anomaly distributions, built once before training (§3.3).

    Openness rules (paper): support and query normals come from two different clusters;
    labelled anomalies are split into disjoint halves (a single one goes into both sets);
    the two sets draw their pseudo anomalies from two different generators.
    """
    n, m, n_gen = layout.n_normal, layout.n_anomaly, len(layout.generators)
    if n == 0:
        raise DataError("AHL needs normal training images")
    info = HADGInfo()
    ids = sorted(set(cluster_labels.tolist()))
    info.cluster_sizes = [int((cluster_labels == c).sum()) for c in ids]
    kept = [c for c in ids if (cluster_labels == c).sum() >= min_cluster_size]
    if membership == "kmeans":
        members = {c: np.flatnonzero(cluster_labels == c) for c in kept}
    elif membership == "prefix":  # the official code: the first |c| files of the list
        members = {c: np.arange(int((cluster_labels == c).sum())) for c in kept}
    else:
        raise ValueError(f"unknown cluster_membership {membership!r}; choose kmeans or prefix")
    if len(kept) < 2:
        # too few normals for two usable clusters: two random halves keep the sets open-set
        perm = rng.permutation(n)
        half = max(1, n // 2)
        members = {0: np.sort(perm[:half]), 1: np.sort(perm[half:]) if n > 1 else np.sort(perm[:half])}
        kept = [0, 1]
        info.fallback = ("random halves of the normals: fewer than two clusters with at least "
                         f"{min_cluster_size} members")
    info.kept_clusters = [int(c) for c in kept]
    pairs = list(itertools.permutations(kept, 2))
    if n_episodes < 1:
        raise ValueError("n_episodes must be at least 1")

    def make_set(normals: np.ndarray, anomalies: np.ndarray, gen: int | None, cluster: int) -> EpisodeSet:
        swap = rng.random(len(normals)) < pseudo_prob if gen is not None else np.zeros(len(normals), bool)
        rows = np.concatenate([layout.normal(normals[~swap]), layout.pseudo(gen or 0, normals[swap]),
                               layout.anomaly(anomalies)]).astype(np.int64)
        labels = np.concatenate([np.zeros((~swap).sum(), np.int64), np.full(swap.sum(), 2, np.int64),
                                 np.ones(len(anomalies), np.int64)])
        return EpisodeSet(rows, labels, int(cluster), gen)

    episodes = []
    for t in range(n_episodes):
        a, b = pairs[t % len(pairs)]
        if m == 0:
            sup_an = qry_an = np.zeros(0, np.int64)
        elif m == 1:
            sup_an = qry_an = np.zeros(1, np.int64)
        elif anomaly_split == "disjoint":
            perm = rng.permutation(m)
            sup_an, qry_an = np.sort(perm[:m // 2]), np.sort(perm[m // 2:])
        elif anomaly_split == "code":
            sup_an = np.sort(rng.choice(m, m // 2, replace=False))
            half = rng.choice(m, m // 2, replace=False)
            extra = rng.choice(half, min(2, len(half)), replace=False)
            qry_an = np.union1d(np.setdiff1d(np.arange(m), half), extra)
        else:
            raise ValueError(f"unknown anomaly_split {anomaly_split!r}; choose disjoint or code")
        if n_gen == 0:
            g_s = g_q = None
        elif generators == "different" and n_gen >= 2:
            g_s, g_q = (int(g) for g in rng.choice(n_gen, 2, replace=False))
        elif generators in ("different", "same"):
            g_s = g_q = int(rng.integers(n_gen))
        else:
            raise ValueError(f"unknown episode_generators {generators!r}; choose different or same")
        ep = Episode(make_set(members[a], sup_an, g_s, a), make_set(members[b], qry_an, g_q, b))
        episodes.append(ep)
        info.episodes.append({
            "support_cluster": int(a), "query_cluster": int(b),
            "support_generator": layout.generators[g_s] if g_s is not None else None,
            "query_generator": layout.generators[g_q] if g_q is not None else None,
            "support_anomalies": sup_an.tolist(), "query_anomalies": qry_an.tolist(),
            "support_size": len(ep.support.rows), "query_size": len(ep.query.rows),
        })
    return episodes, info


class BalancedSampler:
    """Balanced batches from one episode set: equal shares of the kinds present (§0.5:
    16 normal / 16 pseudo / 16 labelled of 48; 24 / 24 when one kind of anomaly is absent)."""

    def __init__(self, s: EpisodeSet, batch_size: int, rng: np.random.Generator):
        self.set = s
        self.kinds = s.kinds()
        self.streams = {k: InfiniteStream(len(v), rng) for k, v in self.kinds.items()}
        keys = sorted(self.kinds)
        share = batch_size // len(keys)
        self.counts = {k: share for k in keys}
        self.counts[keys[0]] += batch_size - share * len(keys)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        pos = np.concatenate([self.kinds[k][self.streams[k].take(c)] for k, c in self.counts.items()])
        return self.set.rows[pos], self.set.labels[pos]


# --------------------------------------------------------------------------------------
# heads, losses, ψ
# --------------------------------------------------------------------------------------
class SignedNormalityHead(nn.Module):
    """AHL code's normality head: DRA's (GAP, Linear C->256, ReLU, Linear 256->1) without the
    absolute value. (Not a subclass of DRA's: importing dra here would register it before
    ahl and change the order methods are offered in.)"""

    def __init__(self, c: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp(f.mean(dim=(2, 3)))[:, 0]


class StridedCompositeHead(nn.Module):
    """AHL code's composite head: 3x3 conv stride 3 (no padding), a per-channel affine
    "BatchNorm" with fixed statistics (mean 0, var 1), ReLU, 1x1 conv -> 1 channel.

    The code initialises the affine scale to 0, which freezes the head at a constant; the
    scale starts at ``scale_init`` (1 = the fix). Maps smaller than 3x3 are zero-padded.
    """

    def __init__(self, c: int, scale_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=3)
        self.scale = nn.Parameter(torch.full((c,), float(scale_init)))
        self.shift = nn.Parameter(torch.zeros(c))
        self.score = nn.Conv2d(c, 1, 1)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        h, w = residual.shape[-2:]
        if h < 3 or w < 3:
            residual = F.pad(residual, (0, max(0, 3 - w), 0, max(0, 3 - h)))
        z = self.conv(residual) / math.sqrt(1 + 1e-5)
        z = z * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return self.score(F.relu(z))[:, 0]


def kaiming_init(heads: nn.Module) -> None:
    """AHL code's head initialisation: Kaiming-normal conv / linear weights, zero biases."""
    for mod in heads.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class HeadNet(nn.Module):
    """The heads as one module whose parameters ``functional_call`` can swap for a base
    model's; ``apply_fn`` is the base detector's ``head_outputs``."""

    def __init__(self, heads: nn.Module, apply_fn):
        super().__init__()
        self.heads = heads
        self.apply_fn = apply_fn

    def forward(self, feats: list[torch.Tensor], ref_feats: list[torch.Tensor] | None) -> dict:
        return self.apply_fn(self.heads, feats, ref_feats)


def devnet_ahl_loss(out: dict, y: torch.Tensor) -> torch.Tensor:
    """AHL(DevNet)'s loss (§3.5): two deviation losses over the batch; in the first the
    labelled anomalies' predictions are replaced by the constant 1 (normals vs pseudo), in
    the second the pseudo anomalies' (normals vs labelled)."""
    s = out["seen"][0]
    t = (y != 0).float()
    one = torch.ones_like(s)
    return deviation_loss(torch.where(y == 1, one, s), t) + deviation_loss(torch.where(y == 2, one, s), t)


class ImportanceEstimator(nn.Module):
    """ψ: from the last K epochs' scores of a sample by the T base models (N, K, T),
    predict the next epoch's T scores (§3.6)."""

    def __init__(self, n_models: int, hidden: int = 6, layers: int = 2, dropout: float = 0.5,
                 head: str = "paper"):
        super().__init__()
        self.lstm = nn.LSTM(n_models, hidden, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        w = 2 * hidden
        if head == "paper":  # a fully connected layer of 2*hidden (12) nodes before the prediction layer
            self.head = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, n_models))
        elif head == "code":
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(w, n_models))
        else:
            raise ValueError(f"unknown psi_head {head!r}; choose paper or code")

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


def base_model_errors(pred: np.ndarray, labels: np.ndarray, rows: np.ndarray, set_ids: np.ndarray,
                      support_rows: list[np.ndarray], mode: str = "paper") -> np.ndarray:
    """Generalisation error r_k of each base model from predicted scores ``pred`` (N, T).

    paper: r_k = mean over D \\ X_n,k of c_j (ŝ_jk - y_j)², with X_n,k the normals of model k's
    support set, c_j = 1.0 for anomalies model k did not train on, 0.5 for those it did and
    for normals. code: 0.5 E_n + 0.5 E_p + 1.0 E_a, each the sum over query sets of the
    per-set mean squared error divided by the number of such samples over all sets.
    """
    n, t = pred.shape
    y = (labels != 0).astype(np.float64)
    err = (pred - y[:, None]) ** 2
    r = np.zeros(t)
    if mode == "paper":
        for k in range(t):
            own = np.isin(rows, support_rows[k])
            keep = ~(own & (labels == 0))
            c = np.where((labels != 0) & ~own, 1.0, 0.5)
            r[k] = float((c[keep] * err[keep, k]).sum() / max(1, keep.sum()))
        return r
    if mode == "code":
        for lab, weight in ((0, 0.5), (2, 0.5), (1, 1.0)):
            sel = labels == lab
            if not sel.any():
                continue
            per_set = sum(err[sel & (set_ids == s)].mean(0) for s in np.unique(set_ids[sel]))
            r += weight * per_set / sel.sum()
        return r
    raise ValueError(f"unknown psi_error {mode!r}; choose paper or code")


def importance_weights(errors: np.ndarray) -> np.ndarray:
    """w = softmax(-r)."""
    z = -np.asarray(errors, np.float64)
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


# --------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------
@register
class AHL(Detector):
    name = "ahl"
    description = ("AHL — learns from several simulated anomaly distributions on top of DRA or DevNet "
                   "(config base); aims at unseen defect types")
    defaults = AHL_DEFAULTS
    presets = {
        "paper": {},
        # stage A: the base's quick preset (224 px, 10 x 10 steps, first 4 trunk stages frozen);
        # stage C: 10 epochs of 6 episodes x (1 + 2 x 5 support + 5 query batches of 30), K = 3
        # (weights from epoch 5), ψ scores 128 query samples per episode, 4 procedural textures.
        # The unified heads start from the stage-A heads: 50 steps cannot train fresh heads as
        # far as the base got (quick, 3 seeds: fresh lost to its base in 4 of 10 data/setting/base
        # cells, stage-A start beat it in all 10; docs/BENCHMARKS.md, "AHL").
        "quick": dict(image_size=224, epochs=10, steps_per_epoch=5, inner_passes=2, batch_size=30,
                      lr_step_epochs=8, psi_seq_len=3, psi_samples_per_set=128, draem_textures=4,
                      heads_init="base"),
        "tiny": dict(image_size=64, map_size=32, epochs=3, steps_per_epoch=2, inner_passes=1, batch_size=12,
                     psi_seq_len=1, psi_warmup_epochs=1, psi_samples_per_set=24, draem_textures=2,
                     kmeans_n_init=2, cache_batch_size=16),
    }
    preset_notes = {
        "quick": ("224 px; base model with its quick preset; AHL 10 epochs, 5 batches of 30 per pass, K = 3, "
                  "heads start from the base model's"),
        "tiny": "64 px, a few steps per stage, for smoke tests",
    }

    def __init__(self, preset: str = "quick", overrides: dict | None = None):
        super().__init__(preset, overrides)
        for key, allowed in CHOICES.items():
            if self.config[key] not in allowed:
                what = "AHL base" if key == "base" else key
                raise ValueError(f"unknown {what} {self.config[key]!r}; choose {' or '.join(allowed)}")
        bad = [g for g in self.config["generators"] if g not in GENERATORS]
        if bad:
            raise ValueError(f"unknown generator {bad[0]!r}; choose from {', '.join(GENERATORS)}")
        if self.config["base_preset"] is None:
            self.config["base_preset"] = preset
        self.stage_seconds: dict[str, float] = {}
        self.hadg_info: dict = {}
        self.weight_history: list[list[float]] = []

    def describe(self) -> str:
        return super().describe().replace(self.name, f"ahl({self.config['base']})", 1)

    # -- building blocks ---------------------------------------------------------------
    def _make_base(self) -> Detector:
        c = self.config
        over = {k: c[k] for k in SHARED_WITH_BASE}
        over.update(c["base_overrides"] or {})
        return make_detector(c["base"], c["base_preset"], over)

    def _make_heads(self) -> nn.Module:
        c, base = self.config, self.base
        ch = self.backbone_info["channels"]
        if c["head_variant"] == "dra" or c["base"] == "devnet":
            heads = base.make_heads(ch)
        elif c["head_variant"] == "code":
            heads = nn.ModuleDict({
                "normal": SignedNormalityHead(ch),
                "seen": nn.Conv2d(ch, 1, 1),
                "pseudo": nn.Conv2d(ch, 1, 1),
                "residual": StridedCompositeHead(ch, c["composite_scale_init"]),
            })
        else:
            raise ValueError(f"unknown head_variant {c['head_variant']!r}; choose dra or code")
        kaiming_init(heads)  # leaves the composite head's affine scale at composite_scale_init
        return heads

    def _loss(self, out: dict, y: torch.Tensor) -> torch.Tensor:
        if self.config["base"] == "devnet":
            return devnet_ahl_loss(out, y)
        return self.base.loss(out, y)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        # the trained base with BatchNorm folded (the model itself while exporting); the base's
        # memory layout / pinning
        model = self.base.model if torch.jit.is_tracing() else self.base._inference_model()
        return model.features(self.base._to_device(x))

    @torch.no_grad()
    def _reference_features(self) -> list[torch.Tensor] | None:
        ref = self.base.reference_batch()
        if ref is None:
            return None
        self.base.model.eval()
        return [f.mean(0, keepdim=True) for f in self._features(ref)]

    def training_stages(self):
        base = {"dra": "DRA", "devnet": "DevNet"}.get(self.config["base"], self.config["base"])
        return [(f"Base model ({base})", 0.5),
                ("Feature cache", 0.1), ("AHL heads", 0.4)]

    # -- fit -----------------------------------------------------------------------------
    def fit(self, train_normal, train_anomalies, callbacks: Callbacks | None = None):
        c = self.config
        if c["base"] == "devnet" and not train_anomalies:
            raise DataError("ahl with base devnet needs at least one labelled anomaly to train")
        t_start = time.monotonic()
        self.base = self._make_base()
        base_epochs = int(self.base.config["epochs"])
        cb = self.progress_callbacks(callbacks)

        # A. the base model, with its own recipe. Only this stage checkpoints: a re-run job
        # resumes or skips it; the cache and the AHL heads are rebuilt from the base model.
        self.base.stage_name = self.training_stages()[0][0]
        t0 = time.monotonic()
        self.base.fit(train_normal, train_anomalies, cb)
        self.stage_seconds = {"base": time.monotonic() - t0}
        self.backbone_info = self.base.backbone_info
        self.device, self.device_name = self.base.device, self.base.device_name
        base_history = [dict(h, stage="base") for h in self.base.history]

        # B. the feature cache
        t0 = time.monotonic()
        normals, _, _ = IMAGE_CACHE.load_many(train_normal, c["image_size"])
        anomalies, _, _ = IMAGE_CACHE.load_many(train_anomalies, c["image_size"])
        layout = CacheLayout(len(normals), len(anomalies), tuple(c["generators"]))
        self.cache = self._build_cache(normals, anomalies, layout, cb)
        self.ref_feats = self._reference_features()
        self.stage_seconds["cache"] = time.monotonic() - t0

        # C. HADG + CDL + ψ on the cache
        t0 = time.monotonic()
        cb.begin("AHL heads", message="clustering normal features")
        ahl_history = self._train_heads(layout, cb, curve_offset=base_epochs + 1)
        self.stage_seconds["ahl"] = time.monotonic() - t0
        for h in ahl_history:
            h["epoch"] += base_epochs + 1
            h["elapsed_s"] += self.stage_seconds["base"] + self.stage_seconds["cache"]
        cache_entry = {"epoch": base_epochs, "loss": float("nan"), "stage": "cache",
                       "elapsed_s": self.stage_seconds["base"] + self.stage_seconds["cache"]}
        self.history = base_history + [cache_entry] + ahl_history
        self.train_seconds = time.monotonic() - t_start
        del self.cache  # the cache is only needed for training
        self.fitted = True
        log.info("ahl(%s) stage times: %s", c["base"], {k: round(v, 1) for k, v in self.stage_seconds.items()})
        return self

    def _build_cache(self, normals: np.ndarray, anomalies: np.ndarray, layout: CacheLayout,
                     cb: Callbacks) -> list[torch.Tensor]:
        """Two-scale maps of every clean normal, labelled anomaly and pseudo anomaly, once."""
        c = self.config
        rng = np.random.default_rng(c["seed"] + 1)
        gen = torch.Generator().manual_seed(c["seed"] + 1)
        size = c["image_size"]
        textures = [augment.procedural_texture(size, size, rng) for _ in range(max(1, c["draem_textures"]))]
        bs = max(1, c["cache_batch_size"])
        n = len(normals)

        def pseudo(g: str, i: int) -> np.ndarray:
            img = normals[i]
            if g == "cutmix":  # G3: the patch comes from another normal image
                j = int(rng.integers(n - 1)) if n > 1 else 0
                return augment.cutmix(img, rng, donor=normals[j + (j >= i) if n > 1 else 0])
            if g == "cutpaste":  # G2
                return augment.cutpaste(img, rng)
            if g == "draem":  # G4
                tex = textures[int(rng.integers(len(textures)))]
                return augment.draem_pseudo(img, rng, tex, rotate_prob=0.3 if c["pseudo_rotate"] else 0.0)
            raise ValueError(f"unknown generator {g!r}; choose from {', '.join(GENERATORS)}")

        jobs = [(layout.normal(np.arange(s, min(n, s + bs))), None, None) for s in range(0, n, bs)]
        jobs += [(layout.anomaly(np.arange(s, min(len(anomalies), s + bs))), None, None)
                 for s in range(0, len(anomalies), bs)]
        for gi, g in enumerate(layout.generators):
            jobs += [(layout.pseudo(gi, np.arange(s, min(n, s + bs))), g, np.arange(s, min(n, s + bs)))
                     for s in range(0, n, bs)]

        dev = self.device if (c["cache_on_device"] and self.device.type == "cuda") else torch.device("cpu")
        cache: list[torch.Tensor] | None = None
        self.base.model.eval()
        cb.begin("Feature cache", len(jobs))
        for k, (rows, g, idx) in enumerate(jobs):
            cb.check_cancel()
            if g is None:
                kind, _, _ = layout.image_of(rows[0])
                imgs = normals[rows] if kind == "normal" else anomalies[rows - layout.n_normal]
                x = augment.test_transform(imgs)
            else:
                imgs = np.stack([pseudo(g, int(i)) for i in idx])
                # the code rotates its offline CutMix / CutPaste images ±180°; by default every cached
                # image gets the same (test) transform so rotation cannot give the pseudo anomalies away
                x = augment.train_transform(imgs, gen, rotate=c["pseudo_rotate"] and g != "draem")
            feats = self._features(x)
            if cache is None:
                need = sum(layout.n_rows * f[0].numel() * 4 for f in feats)
                if dev.type == "cuda" and need > 0.6 * torch.cuda.mem_get_info(dev)[0]:
                    log.warning("AHL feature cache (%.1f GB) does not fit on the GPU; keeping it in host memory",
                                need / 1e9)
                    dev = torch.device("cpu")
                cache = [torch.empty((layout.n_rows, *f.shape[1:]), dtype=torch.float32, device=dev) for f in feats]
            r = torch.as_tensor(rows, device=dev)
            for store, f in zip(cache, feats):
                store[r] = f.float().to(dev)
            cb.advance(k + 1, force=k + 1 == len(jobs))
        return cache

    def _batch(self, rows: np.ndarray) -> list[torch.Tensor]:
        r = torch.as_tensor(rows, device=self.cache[0].device)
        return [f[r].to(self.device, non_blocking=True) for f in self.cache]

    def _train_heads(self, layout: CacheLayout, cb: Callbacks, curve_offset: int = 0) -> list[dict]:
        c = self.config
        seed_everything(c["seed"])
        rng = np.random.default_rng(c["seed"] + 2)

        # HADG
        flat = self.cache[0][:layout.n_normal].flatten(1).cpu().numpy()  # normals are the first rows
        labels = cluster_normals(flat, c["n_clusters"], c["seed"], c["kmeans_n_init"])
        del flat
        episodes, info = build_episodes(
            labels, layout, rng, n_episodes=c["n_episodes"], min_cluster_size=c["min_cluster_size"],
            membership=c["cluster_membership"], anomaly_split=c["anomaly_split"],
            generators=c["episode_generators"], pseudo_prob=c["pseudo_prob"])
        self.hadg_info = info.__dict__
        if info.fallback:
            log.warning("AHL HADG: %s", info.fallback)
        T = len(episodes)
        samplers = [(BalancedSampler(e.support, c["batch_size"], rng), BalancedSampler(e.query, c["batch_size"], rng))
                    for e in episodes]

        # the unified heads
        self.headnet = HeadNet(self._make_heads(), self.base.head_outputs).to(self.device)
        if c["heads_init"] == "base":
            self.headnet.heads.load_state_dict(self.base.model.heads.state_dict())
        names = [k for k, p in self.headnet.named_parameters() if p.requires_grad]
        params = [p for _, p in self.headnet.named_parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=c["lr"], weight_decay=c["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c["lr_step_epochs"], gamma=c["lr_gamma"])

        # ψ and its data: the query samples of every episode, scored by every base model each epoch
        pool_rows, pool_labels, pool_sets = self._psi_pool(episodes, rng)
        psi = ImportanceEstimator(T, c["psi_hidden"], c["psi_layers"], c["psi_dropout"], c["psi_head"]).to(self.device)
        psi_opt = torch.optim.Adam(psi.parameters(), lr=c["psi_lr"], weight_decay=c["psi_weight_decay"])
        support_rows = [e.support.rows for e in episodes]
        score_hist: list[np.ndarray] = []  # per epoch (N_pool, T)
        K = int(c["psi_seq_len"])
        state = {"weights": np.full(T, 1.0 / T), "psi_active": False, "epoch_scores": None}
        psi_losses: dict[int, float] = {}
        self.weight_history = []

        def loss_at(theta: list[torch.Tensor], rows: np.ndarray, y: np.ndarray) -> torch.Tensor:
            out = functional_call(self.headnet, dict(zip(names, theta)), (self._batch(rows), self.ref_feats))
            return self._loss(out, torch.as_tensor(y, device=self.device))

        def epoch_start(epoch: int) -> None:
            self.headnet.train()
            w = np.full(T, 1.0 / T)
            state["psi_active"] = False
            if c["use_psi"] and epoch >= K + c["psi_warmup_epochs"] and len(score_hist) >= K:
                pred = self._psi_predict(psi, np.stack(score_hist[-K:], 1))
                r = base_model_errors(self._psi_error_scale(pred), pool_labels, pool_rows, pool_sets, support_rows,
                                      c["psi_error"])
                w = importance_weights(r)
                state["psi_active"] = True
            state["weights"] = w
            state["epoch_scores"] = np.zeros((len(pool_rows), T), np.float32)
            self.weight_history.append(w.tolist())

        def episode_step(epoch: int, i: int) -> float:
            sup, qry = samplers[i]
            w = state["weights"]
            if state["psi_active"] and c["loss_weighting"] == "code":
                weight = 0.5 + 0.5 * float(w[i])
            else:
                weight = float(w[i])  # 1/T until ψ is ready, and always without ψ
            q_loss, theta = self._adapt_and_query(params, loss_at, sup, qry, weight, cb)
            if c["use_psi"]:
                state["epoch_scores"][:, i] = self._score_rows(names, theta, pool_rows)
            if i == T - 1:
                epoch_end(epoch)
            return q_loss

        def epoch_end(epoch: int) -> None:
            if c["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if c["use_psi"]:
                score_hist.append(state["epoch_scores"])
                if len(score_hist) > K:
                    psi_losses[epoch] = self._psi_train(psi, psi_opt, np.stack(score_hist[-K - 1:], 1), pool_sets)

        for p in params:
            p.grad = None
        history = run_loop(episode_step, c["epochs"], T, cb, on_epoch_start=epoch_start, stage="AHL heads",
                           curve_offset=curve_offset)
        for e, (h, w) in enumerate(zip(history, self.weight_history)):
            h["stage"] = "ahl"
            h["weights"] = [round(x, 4) for x in w]
            if e in psi_losses:
                h["psi_loss"] = psi_losses[e]
        self.headnet.eval()
        self.psi_state = {k: v.cpu() for k, v in psi.state_dict().items()}
        return history

    def _adapt_and_query(self, params, loss_at, sup: BalancedSampler, qry: BalancedSampler, weight: float,
                         cb: Callbacks) -> tuple[float, list[torch.Tensor]]:
        """One CDL episode: a base model starts from the unified heads, adapts on its support
        set, and its weighted query loss is back-propagated into the unified heads' gradients.

        θ'_1 = θ_g - α ∇L_s(θ_g) keeps its graph (second order); the further adaptation steps
        are first order, so d Lq / d θ_g = (I - α H_s) ∇Lq(θ'), applied as one
        vector-Jacobian product through θ'_1.
        """
        c = self.config
        alpha = c["inner_lr"]
        rows, y = sup.sample()
        grads = torch.autograd.grad(loss_at(params, rows, y), params, create_graph=True, allow_unused=True)
        theta1 = [p - alpha * g if g is not None else p * 1.0 for p, g in zip(params, grads)]
        theta = [t.detach().requires_grad_() for t in theta1]
        adam = c["inner_optimizer"] == "adam"
        m = [torch.zeros_like(t) for t in theta] if adam else None
        v = [torch.zeros_like(t) for t in theta] if adam else None
        step = 0
        for _ in range(c["inner_passes"]):
            cb.check_cancel()
            for _ in range(c["steps_per_epoch"]):
                rows, y = sup.sample()
                g = torch.autograd.grad(loss_at(theta, rows, y), theta, allow_unused=True)
                g = [gi if gi is not None else torch.zeros_like(t) for gi, t in zip(g, theta)]
                step += 1
                with torch.no_grad():
                    if adam:
                        new = []
                        for t, gi, mi, vi in zip(theta, g, m, v):
                            mi.mul_(0.9).add_(gi, alpha=0.1)
                            vi.mul_(0.999).addcmul_(gi, gi, value=0.001)
                            mh, vh = mi / (1 - 0.9 ** step), vi / (1 - 0.999 ** step)
                            new.append(t - alpha * mh / (vh.sqrt() + 1e-8))
                    else:
                        new = [t - alpha * gi for t, gi in zip(theta, g)]
                theta = [t.detach().requires_grad_() for t in new]
        cb.check_cancel()
        total, vjp = 0.0, [torch.zeros_like(t) for t in theta]
        for _ in range(c["steps_per_epoch"]):
            rows, y = qry.sample()
            loss = loss_at(theta, rows, y)
            g = torch.autograd.grad(loss, theta, allow_unused=True)
            for acc, gi in zip(vjp, g):
                if gi is not None:
                    acc.add_(gi)
            total += float(loss.detach())
        torch.autograd.backward(theta1, grad_tensors=[weight * g for g in vjp])
        return total, [t.detach() for t in theta]

    # -- ψ ---------------------------------------------------------------------------------
    def _psi_pool(self, episodes: list[Episode], rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query samples scored for ψ: per episode all its labelled anomalies and up to
        ``psi_samples_per_set`` samples in total (0 = the whole query set), fixed once."""
        cap = int(self.config["psi_samples_per_set"])
        rows, labels, sets = [], [], []
        for s, e in enumerate(episodes):
            q = e.query
            idx = np.arange(len(q.rows))
            if cap and len(idx) > cap:
                an = idx[q.labels == 1]
                rest = idx[q.labels != 1]
                take = rng.choice(rest, max(0, min(len(rest), cap - len(an))), replace=False)
                idx = np.sort(np.concatenate([an, take]))
            rows.append(q.rows[idx])
            labels.append(q.labels[idx])
            sets.append(np.full(len(idx), s))
        return np.concatenate(rows), np.concatenate(labels), np.concatenate(sets)

    @torch.no_grad()
    def _score_rows(self, names, theta, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Test scores of a base model (parameters ``theta``) on cache rows (eval mode)."""
        self.headnet.eval()
        out = []
        for s in range(0, len(rows), chunk):
            o = functional_call(self.headnet, dict(zip(names, theta)), (self._batch(rows[s:s + chunk]), self.ref_feats))
            out.append(self.base.score(o).float().cpu().numpy())
        self.headnet.train()
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _psi_scale(self, scores: np.ndarray) -> np.ndarray:
        # ψ reads scores in units of the deviation margin (O(1) values for the LSTM)
        return scores / DEV_MARGIN if self.config["psi_score_scale"] == "margin" else scores

    def _psi_error_scale(self, pred: np.ndarray) -> np.ndarray:
        # raw deviation scores put anomalies at >= 5, so (ŝ - 1)² would reward a weakly scored
        # anomaly; clipped margin units make ŝ = 1 "confident anomaly", 0 "confident normal"
        if self.config["psi_score_scale"] == "margin":
            return np.clip(pred, 0.0, 1.0)
        if self.config["psi_score_scale"] == "raw":
            return pred
        raise ValueError(f"unknown psi_score_scale {self.config['psi_score_scale']!r}; choose margin or raw")

    def _psi_train(self, psi, opt, seq: np.ndarray, sets: np.ndarray) -> float:
        """One Adam step per episode's query set: predict epoch e from epochs e-K..e-1."""
        x = torch.as_tensor(self._psi_scale(seq), dtype=torch.float32, device=self.device)  # (N, K+1, T)
        psi.train()
        losses = []
        for s in np.unique(sets):
            sel = torch.as_tensor(np.flatnonzero(sets == s), device=self.device)
            loss = F.mse_loss(psi(x[sel, :-1]), x[sel, -1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    @torch.no_grad()
    def _psi_predict(self, psi, seq: np.ndarray) -> np.ndarray:
        psi.eval()
        x = torch.as_tensor(self._psi_scale(seq), dtype=torch.float32, device=self.device)
        return psi(x).cpu().numpy().astype(np.float64)

    # -- inference -------------------------------------------------------------------------
    # ONNX export (osad_core.export) ---------------------------------------------------------
    def prepare_export(self) -> None:
        self.base.model.eval()
        self.headnet.eval()
        if getattr(self, "ref_feats", None) is None and self.config["base"] == "dra":
            self.ref_feats = self._reference_features()

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (scores, maps), as :meth:`predict_arrays` computes them."""
        out = self.headnet(self._features(x), self.ref_feats)
        return self.base.score(out), self.base.anomaly_map(out, self.config["map_size"])

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> Prediction:
        if not self.fitted:
            raise RuntimeError("fit or load the detector before predicting")
        self.base.model.eval()
        self.headnet.eval()
        if getattr(self, "ref_feats", None) is None and self.config["base"] == "dra":
            self.ref_feats = self._reference_features()
        S = self.config["map_size"]
        scores, maps, embs, extra = [], [], [], {}
        for i in range(0, len(images), batch_size):
            feats = self._features(augment.test_transform(images[i:i + batch_size]))
            out = self.headnet(feats, self.ref_feats)
            scores.append(self.base.score(out).float().cpu())
            maps.append(self.base.anomaly_map(out, S).float().cpu())
            embs.append(feats[0].mean(dim=(2, 3)).float().cpu())
            for k, (v, _) in out.items():
                extra.setdefault(f"head_{k}", []).append(v.float().cpu())
            base_out = self.base.head_outputs(self.base.model.heads, feats, self.ref_feats)
            extra.setdefault("base_score", []).append(self.base.score(base_out).float().cpu())
        return Prediction(
            torch.cat(scores).numpy(),
            torch.cat(maps).numpy(),
            torch.cat(embs).numpy(),
            f"global average pool of the scale-0 map of the {self.config['base']} base model's backbone "
            f"({self.backbone_info['channels']}-d)",
            extra={k: torch.cat(v).numpy() for k, v in extra.items()},
        )

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "base_preset": self.base.preset,
            "base_config": self.base.config,
            "base_history": self.base.history,
            "base_state": self.base.state(),
            "heads": {k: v.cpu() for k, v in self.headnet.state_dict().items()},
            "psi": getattr(self, "psi_state", None),
            "hadg": self.hadg_info,
            "weight_history": self.weight_history,
            "stage_seconds": self.stage_seconds,
        }

    def load_state(self, state: dict) -> None:
        base = REGISTRY[self.config["base"]](preset=state["base_preset"])
        base.config.update(state["base_config"])
        base.config["device"] = self.config["device"]
        base.backbone_info = self.backbone_info
        base.history = state.get("base_history", [])
        base.load_state(state["base_state"])
        base.fitted = True
        self.base = base
        self.device, self.device_name = base.device, base.device_name
        self.headnet = HeadNet(self._make_heads(), base.head_outputs).to(self.device)
        self.headnet.load_state_dict(state["heads"])
        self.headnet.eval()
        self.psi_state = state.get("psi")
        self.hadg_info = state.get("hadg", {})
        self.weight_history = state.get("weight_history", [])
        self.stage_seconds = state.get("stage_seconds", {})
        self.ref_feats = None  # recomputed from the base model's stored reference images

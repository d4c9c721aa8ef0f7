"""What DevNet, DRA, AHL and SaliencyCut share (METHODS.md §0).

A fine-tuned backbone applied at two scales (the image and its half-size copy), heads
applied per scale and averaged, top-K MIL scoring, the deviation loss, balanced batches
with pseudo anomalies, and a per-position anomaly map from the heads' score maps.
Subclasses supply the heads (:meth:`make_heads`), how they are applied
(:meth:`head_outputs`), the loss and the test score.
"""
from __future__ import annotations

import copy

import json

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..backbones import LITE_LEVEL_ENDS, build_arch_only, build_backbone, cut_trunk, fold_batchnorm
from ..data import IMAGE_CACHE, DataError, ImageRecord
from ..train import Callbacks, InfiniteStream, Resumable, describe_device, resolve_device, run_loop, seed_everything
from .base import Detector, Prediction

log = logging.getLogger(__name__)

# Shared defaults = the papers' code (METHODS.md §0, §1, §2.6); subclasses override.
FAMILY_DEFAULTS = dict(
    image_size=448,
    n_scales=2,
    epochs=30,
    steps_per_epoch=20,
    batch_size=48,
    anomaly_fraction=1 / 3,  # share of the batch given to labelled anomalies
    pseudo_prob=0.5,  # chance that a normal slot becomes a pseudo anomaly
    lr=2e-4,
    weight_decay=1e-5,
    lr_step_epochs=10,
    lr_gamma=0.1,
    lr_step_at_epoch_start=True,  # DRA steps StepLR at the start of each epoch, DevNet after it
    grad_clip=1.0,
    topk=0.1,
    rotate=True,
    backbone="auto",
    weights="auto",
    weights_path=None,
    freeze_levels=0,  # 0 = fine-tune everything, as the papers do; only applied to pretrained trunks
    trunk_stride=32,  # 16: the trunk ends after its stride-16 level (a 14×14 map at 224 px)
    device="auto",
    # training-speed settings for a GPU (any device accepts them; the defaults are what every
    # benchmark here ran): mixed precision ("bf16", or "fp16" with loss scaling), the
    # channels-last layout ("auto": on a CPU, where oneDNN's kernels want it, not on CUDA), and
    # the training images kept on the device as uint8, augmented there
    amp="off",
    channels_last="auto",
    data_on_device=False,
    seed=42,
    map_size=64,
    test_batch_size=32,
)
FAMILY_CHOICES = {"amp": ("off", "bf16", "fp16"), "channels_last": ("auto", True, False),
                  "data_on_device": (True, False)}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def topk_mean(smap: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top-K MIL (§0.3): mean of the k = max(1, floor(ratio*h*w)) largest |S| values."""
    flat = smap.abs().flatten(1)
    k = max(1, int(math.floor(ratio * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


class TwoScaleModel(nn.Module):
    def __init__(self, trunk: nn.Module, heads: nn.Module, n_scales: int = 2):
        super().__init__()
        self.trunk, self.heads, self.n_scales = trunk, heads, n_scales

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.trunk(x)]
        if self.n_scales > 1:
            # the normalised tensor resized to half size, nearest neighbour (§0.2)
            half = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="nearest")
            feats.append(self.trunk(half))
        return feats


# Trunk modules up to the end of each stride level (1: stride 4, 2: stride 8, 3: stride 16).
def _level_modules(trunk: nn.Module, levels: int) -> list[nn.Module]:
    if hasattr(trunk, "body"):  # torchvision ResNet: conv1, bn1, relu, maxpool, layer1..layer4
        return list(trunk.body.children())[: 4 + levels]
    net = trunk.net  # EfficientNet-Lite: its blocks end each stride level at LITE_LEVEL_ENDS
    return [net._conv_stem, net._bn0, *net._blocks[: LITE_LEVEL_ENDS[net.arch][levels - 1]]]


def freeze_levels(trunk: nn.Module, levels: int) -> list[nn.Module]:
    """Freeze the trunk up to the end of stride level ``levels`` (0 = nothing; at most 3).

    A cheap-preset device: the pretrained early layers stay as they are, and backward
    stops there. Returns the frozen modules so training keeps them in eval mode (their
    BatchNorm statistics stay the pretrained ones).
    """
    if levels <= 0:
        return []
    mods = _level_modules(trunk, min(int(levels), 3))
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)
    return mods


class DRAFamilyDetector(Detector):
    defaults = FAMILY_DEFAULTS
    choices = FAMILY_CHOICES
    map_heads: tuple[str, ...] = ()  # heads whose position maps make the anomaly map
    subtracted_heads: tuple[str, ...] = ("normal",)  # heads the test score subtracts (high on normals)
    n_refs = 0  # reference images prepended to each batch (DRA's residual head)
    needs_anomalies = False
    stage_name = "Training"  # the progress stage of fit() (AHL names its base model's)

    # -- to implement -----------------------------------------------------------------
    def make_heads(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def head_outputs(self, heads: nn.Module, feats: list[torch.Tensor],
                     ref_feats: list[torch.Tensor] | None) -> dict[str, tuple[torch.Tensor, list[torch.Tensor] | None]]:
        """head name -> (image score (B,) averaged over scales, per-scale maps or None)."""
        raise NotImplementedError

    def loss(self, out: dict, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, out: dict) -> torch.Tensor:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------
    def _build(self, fresh: bool) -> None:
        c = self.config
        if fresh:
            trunk, info = build_backbone(c["backbone"], c["weights"], c["weights_path"])
            self.backbone_info = info.to_dict()
        else:
            trunk = build_arch_only(self.backbone_info)
        self.channels = cut_trunk(trunk, int(c.get("trunk_stride", 32)))
        heads = self.make_heads(self.channels)
        self.model = TwoScaleModel(trunk, heads, c["n_scales"])
        # freezing random weights would only hurt: a random-init trunk is always trained
        pretrained = bool(self.backbone_info.get("pretrained"))
        self.frozen = freeze_levels(trunk, c["freeze_levels"] if pretrained else 0)
        if c["freeze_levels"] and not pretrained:
            log.info("freeze_levels=%s ignored: the backbone is not pretrained", c["freeze_levels"])
        self.device = resolve_device(c["device"])
        self.device_name = describe_device(self.device)
        # channels-last lets oneDNN pick faster convolution kernels on the CPU (a 32-image
        # 224 px EfficientNet-Lite0 training pass took 51 s instead of 84 s on a busy
        # 2-core machine); CUDA keeps the default layout unless asked
        cl = c.get("channels_last", "auto")
        self.memory_format = (torch.channels_last if (cl == "auto" and self.device.type == "cpu") or cl is True
                              else torch.contiguous_format)
        self.model.to(self.device, memory_format=self.memory_format)

    def _load_arrays(self, records: list[ImageRecord]) -> np.ndarray:
        arr, ok, bad = IMAGE_CACHE.load_many(records, self.config["image_size"])
        self.skipped_train = getattr(self, "skipped_train", []) + bad
        return arr

    def _batch_images(self, normals: np.ndarray, anomalies: np.ndarray):
        """A function from a batch's picks (see ``fit``'s step) to its uint8 images (B, S, S, 3):
        stacked on the host, or, with ``data_on_device``, gathered from copies of the training
        images kept on the device (only the synthesised ones travel each step)."""
        if not self.config.get("data_on_device"):
            sources = {"normal": normals, "anomaly": anomalies}
            return lambda picks: np.stack([v if k == "pseudo" else sources[k][v] for k, v in picks])
        dev = self.device
        kept = {"normal": augment.uint8_tensor(normals).to(dev), "anomaly": augment.uint8_tensor(anomalies).to(dev)}

        def gather(picks: list) -> torch.Tensor:
            x = torch.empty((len(picks), *normals.shape[1:]), dtype=torch.uint8, device=dev)
            for kind in ("normal", "anomaly", "pseudo"):
                pos = [j for j, (k, _) in enumerate(picks) if k == kind]
                if not pos:
                    continue
                if kind == "pseudo":
                    x[pos] = augment.uint8_tensor(np.stack([picks[j][1] for j in pos])).to(dev)
                else:
                    x[pos] = kept[kind][torch.tensor([picks[j][1] for j in pos], device=dev)]
            return x
        return gather

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the model's device and in its layout (a batch already there, e.g. with
        ``data_on_device``, is only laid out: only host memory can be pinned)."""
        if x.device.type == "cpu" and self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        return x.contiguous(memory_format=self.memory_format)

    def fit(self, train_normal, train_anomalies, callbacks: Callbacks | None = None):
        c = self.config
        seed_everything(c["seed"])
        if self.needs_anomalies and not train_anomalies:
            raise DataError(f"{self.name} needs at least one labelled anomaly to train")
        self.skipped_train = []
        normals = self._load_arrays(train_normal)
        anomalies = self._load_arrays(train_anomalies)
        if len(normals) == 0:
            raise DataError("no readable normal training images")
        self._build(fresh=True)
        rng = np.random.default_rng(c["seed"])
        gen = torch.Generator().manual_seed(c["seed"])
        self.prepare_training(normals, anomalies, rng)

        B = c["batch_size"]
        n_an = int(round(B * c["anomaly_fraction"])) if len(anomalies) else 0
        n_slots = B - n_an
        s_norm, s_an = InfiniteStream(len(normals), rng), InfiniteStream(max(1, len(anomalies)), rng)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=c["lr"], weight_decay=c["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c["lr_step_epochs"], gamma=c["lr_gamma"])

        amp = c.get("amp", "off")
        # fp16 needs loss scaling (its small gradients underflow); bf16 has float32's range
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        batch_images = self._batch_images(normals, anomalies)

        def step(epoch: int, it: int) -> float:
            picks, ys = [], []  # per slot ("normal" | "anomaly", index) or ("pseudo", image)
            for i in s_norm.take(n_slots):
                if c["pseudo_prob"] > 0 and rng.random() < c["pseudo_prob"]:
                    src = normals[int(rng.integers(len(normals)))]  # DRA: a random normal image
                    picks.append(("pseudo", self.make_pseudo(src, normals, rng)))
                    ys.append(2)
                else:
                    picks.append(("normal", i))
                    ys.append(0)
            for i in s_an.take(n_an):
                picks.append(("anomaly", i))
                ys.append(1)
            x = augment.train_transform(batch_images(picks), gen, rotate=c["rotate"])
            y = torch.tensor(ys).to(self.device)
            x = self.prepare_batch(self._to_device(x), y, rng)
            self.model.train()
            for m in self.frozen:
                m.eval()
            with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "off"):
                out = self.forward(x, train=True)
                loss = self.loss(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if c["grad_clip"]:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
            scaler.step(opt)
            scaler.update()
            return loss.item()

        def epoch_start(epoch: int) -> None:
            if c["lr_step_at_epoch_start"] and epoch > 0:
                sched.step()
            self.before_epoch(epoch, normals, rng)

        def epoch_end_wrapper(epoch: int, it: int) -> float:
            loss = step(epoch, it)
            if not c["lr_step_at_epoch_start"] and it == c["steps_per_epoch"] - 1:
                sched.step()
            return loss

        def get_state() -> dict:
            return {"model": self.model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(),
                    "streams": [list(s_norm._perm), list(s_an._perm)], "extra": self.extra_train_state()}

        def set_state(st: dict) -> None:
            self.model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            if st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            rng.bit_generator.state = st["rng"]
            gen.set_state(st["gen"])
            s_norm._perm, s_an._perm = [int(i) for i in st["streams"][0]], [int(i) for i in st["streams"][1]]
            self.load_extra_train_state(st["extra"])

        key = json.dumps({"method": self.name, "config": c}, sort_keys=True, default=str)
        t0 = time.monotonic()
        self.history = run_loop(epoch_end_wrapper, c["epochs"], c["steps_per_epoch"],
                                self.progress_callbacks(callbacks), on_epoch_start=epoch_start,
                                stage=self.stage_name,
                                resumable=Resumable(get_state, set_state, key))
        self.train_seconds = time.monotonic() - t0
        self.fitted = True
        self._ref_cache = None
        self.__dict__.pop("_folded_model", None)
        return self

    # hooks with defaults -------------------------------------------------------------
    def extra_train_state(self) -> dict:
        """State a subclass changes during training beyond model, optimiser and data RNGs
        (checkpointed every epoch so a resumed run ends exactly as an uninterrupted one)."""
        return {}

    def load_extra_train_state(self, state: dict) -> None:
        pass

    def prepare_training(self, normals: np.ndarray, anomalies: np.ndarray, rng: np.random.Generator) -> None:
        """Called once before the loop (DRA picks its reference images here)."""

    def make_pseudo(self, src: np.ndarray, normals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return augment.cutmix(src, rng)

    def before_epoch(self, epoch: int, normals: np.ndarray, rng: np.random.Generator) -> None:
        """Called at the start of every epoch (SaliencyCut refreshes its saliency masks here)."""

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Last change to a transformed training batch (on the device) before the training pass.

        May use the current model (SaliencyCut's per-iteration pseudo anomalies); the loop
        puts the model back into training mode afterwards.
        """
        return x

    def reference_batch(self, train: bool = False) -> torch.Tensor | None:
        """Normalised reference images prepended to a batch (``train``: a training pass)."""
        return None

    def forward(self, x: torch.Tensor, train: bool) -> dict:
        ref = self.reference_batch(train=train)
        ref_feats = None
        if ref is not None:
            ref = self._to_device(ref)
            if train:
                # references share the training pass (as in DRA) so BatchNorm sees them too
                feats_all = self.model.features(torch.cat([ref, x]))
                n = ref.shape[0]
                ref_feats = [f[:n].mean(0, keepdim=True) for f in feats_all]
                feats = [f[n:] for f in feats_all]
            else:
                if self._ref_cache is None:
                    self._ref_cache = [f.mean(0, keepdim=True) for f in self.model.features(ref)]
                ref_feats = self._ref_cache
                feats = self.model.features(x)
        else:
            feats = self.model.features(x)
        out = self.head_outputs(self.model.heads, feats, ref_feats)
        out["_embedding"] = (feats[0].mean(dim=(2, 3)), None)
        return out

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> Prediction:
        if not self.fitted:
            raise RuntimeError("fit or load the detector before predicting")
        self.model.eval()
        self._ref_cache = None
        trained, self.model = self.model, self._inference_model()
        try:
            return self._predict_batches(images, batch_size)
        finally:
            self.model = trained

    def _inference_model(self) -> nn.Module:
        """The trained model with BatchNorm folded into its convolutions (same outputs up to
        float rounding; BN was over a third of a CPU scoring pass). Kept until the model
        changes (fit, load); never saved or exported."""
        folded = self.__dict__.get("_folded_model")
        if folded is None:
            folded = fold_batchnorm(copy.deepcopy(self.model)).to(memory_format=self.memory_format)
            self.__dict__["_folded_model"] = folded
        return folded

    def _predict_batches(self, images: np.ndarray, batch_size: int) -> Prediction:
        S = self.config["map_size"]
        scores, maps, embs, extra = [], [], [], {}
        for i in range(0, len(images), batch_size):
            x = self._to_device(augment.test_transform(images[i:i + batch_size]))
            out = self.forward(x, train=False)
            scores.append(self.score(out).float().cpu())
            maps.append(self.anomaly_map(out, S).float().cpu())
            embs.append(out["_embedding"][0].float().cpu())
            for k, (v, _) in out.items():
                if not k.startswith("_"):
                    extra.setdefault(f"head_{k}", []).append(v.float().cpu())
        return Prediction(
            torch.cat(scores).numpy(),
            torch.cat(maps).numpy(),
            torch.cat(embs).numpy(),
            f"global average pool of the scale-0 backbone map ({self.channels}-d)",
            extra={k: torch.cat(v).numpy() for k, v in extra.items()},
        )

    def head_scores(self, pred: Prediction) -> dict[str, np.ndarray]:
        out = {}
        for key, v in pred.extra.items():
            if key.startswith("head_"):
                name = key[len("head_"):]
                out[name] = -v if name in self.subtracted_heads else v
        return out

    # ONNX export (osad_core.export) ---------------------------------------------------------
    @torch.no_grad()
    def prepare_export(self) -> None:
        """Eval mode and the reference features computed once: a constant of the graph."""
        self.model.eval()
        self._ref_cache = None
        ref = self.reference_batch()
        if ref is not None:
            self._ref_cache = [f.mean(0, keepdim=True) for f in self.model.features(self._to_device(ref))]

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (scores, maps), exactly as :meth:`predict_arrays` computes them."""
        out = self.forward(x, train=False)
        return self.score(out), self.anomaly_map(out, self.config["map_size"])

    def anomaly_map(self, out: dict, size: int) -> torch.Tensor:
        """Sum of the map heads' |score maps|, each scale upsampled to ``size``, scales averaged."""
        total = None
        for name in self.map_heads:
            per_scale = out[name][1]
            ups = [F.interpolate(m.abs().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
                   for m in per_scale]
            m = torch.stack(ups).mean(0)[:, 0]
            total = m if total is None else total + m
        return total

    # persistence ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()}}

    def load_state(self, state: dict) -> None:
        self._build(fresh=False)
        self.model.load_state_dict(state["model"])
        self._ref_cache = None
        self.__dict__.pop("_folded_model", None)


def conv_score_map(conv: nn.Module, feats: list[torch.Tensor], topk: float):
    """Apply a 1-channel conv head to each scale: (image score averaged over scales, maps)."""
    maps = [conv(f)[:, 0] for f in feats]
    score = torch.stack([topk_mean(m, topk) for m in maps]).mean(0)
    return score, maps

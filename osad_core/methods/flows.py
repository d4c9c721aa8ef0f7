"""Conditional normalizing flows over feature vectors (BGAD, METHODS.md §5.1-5.2).

Written in plain PyTorch rather than with FrEIA. The block BGAD uses (FrEIA's
"AllInOneBlock" with a condition) is about forty lines; writing it here keeps the exact
computation METHODS.md specifies under our control (the papers pin a FrEIA commit whose
details differ from the current release), needs no extra dependency on an offline
machine, and lets the log-determinant be tested directly.

One block maps x ∈ R^d, conditioned on c (the positional code):
  split x = (x1, x2), |x1| = d - ⌊d/2⌋;  (a_s, a_t) = 0.1 · subnet([x1, c]);
  s = α·tanh(a_s);  x2 ← x2·exp(s) + a_t;                  log|det| += Σ s
  x ← x·scale + offset,  scale = 0.1·softplus_{β=0.5}(p);  log|det| += Σ log scale
  x ← x · Rᵀ with a fixed random rotation R ∈ SO(d)        (|det| = 1)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def positional_encoding_2d(channels: int, h: int, w: int) -> torch.Tensor:
    """(channels, h, w) sin/cos code: the first half encodes the column, the second the row,
    each as interleaved sin/cos at channels/4 frequencies 10000^(-2k/(channels/2))."""
    if channels % 4:
        raise ValueError(f"positional code channels must be a multiple of 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(10000.0) / half))  # (half/2,)
    col = torch.arange(w, dtype=torch.float32)[:, None] * freq  # (w, half/2)
    row = torch.arange(h, dtype=torch.float32)[:, None] * freq
    pe = torch.zeros(channels, h, w)
    pe[0:half:2] = torch.sin(col).t()[:, None, :].expand(-1, h, -1)
    pe[1:half:2] = torch.cos(col).t()[:, None, :].expand(-1, h, -1)
    pe[half::2] = torch.sin(row).t()[:, :, None].expand(-1, -1, w)
    pe[half + 1::2] = torch.cos(row).t()[:, :, None].expand(-1, -1, w)
    return pe


def _random_rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random matrix of SO(d) (QR of a Gaussian matrix with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


class ConditionalCouplingBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, gen: torch.Generator, clamp: float = 1.9,
                 hidden_factor: int = 2):
        super().__init__()
        self.d1 = dim - dim // 2
        self.d2 = dim // 2
        self.clamp = clamp
        n_in = self.d1 + cond_dim
        self.subnet = nn.Sequential(nn.Linear(n_in, hidden_factor * n_in), nn.ReLU(),
                                    nn.Linear(hidden_factor * n_in, 2 * self.d2))
        # softplus_{β=0.5}(p) = 2·log(1 + e^{p/2}); p chosen so 0.1·softplus(p) = 1
        p0 = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)
        self.global_scale = nn.Parameter(torch.full((dim,), p0))
        self.global_offset = nn.Parameter(torch.zeros(dim))
        self.register_buffer("rotation", _random_rotation(dim, gen))

    def _subnet(self, x1: torch.Tensor, cond) -> torch.Tensor:
        """subnet([x1, c]). With ``cond = (table, index)`` the condition's share of the first
        layer is computed once per table row and gathered: the same value, several times
        cheaper when many vectors share few positions (the code is 128-d, x1 often 12-d)."""
        if not isinstance(cond, tuple):
            return self.subnet(torch.cat([x1, cond], 1))
        table, index = cond
        first = self.subnet[0]
        w = first.weight
        h = x1 @ w[:, :self.d1].t() + (table @ w[:, self.d1:].t() + first.bias)[index]
        return self.subnet[2](self.subnet[1](h))

    def forward(self, x: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, :self.d1], x[:, self.d1:]
        a = 0.1 * self._subnet(x1, cond)
        s = self.clamp * torch.tanh(a[:, :self.d2])
        x2 = x2 * torch.exp(s) + a[:, self.d2:]
        scale = 0.1 * F.softplus(self.global_scale, beta=0.5)
        y = torch.cat([x1, x2], 1) * scale + self.global_offset
        logdet = s.sum(1) + torch.log(scale).sum()
        return y @ self.rotation.t(), logdet

    def inference_constants(self, table: torch.Tensor) -> tuple:
        """What :meth:`forward` computes from the weights and the code table alone, folded
        for scoring in :meth:`forward_grid`'s layout (one column per vector): the
        condition's share of the first layer per table row, the 0.1 of the output layer,
        and scale and offset moved through the rotation (R·(scale ⊙ y + offset) =
        (R·diag(scale))·y + R·offset)."""
        first, last = self.subnet[0], self.subnet[2]
        scale = 0.1 * F.softplus(self.global_scale, beta=0.5)
        return (torch.addmm(first.bias[:, None], first.weight[:, self.d1:], table.t()),
                first.weight[:, :self.d1].contiguous(), (0.1 * last.weight).contiguous(), 0.1 * last.bias[:, None],
                (self.rotation * scale).contiguous(), (self.rotation @ self.global_offset)[:, None],
                torch.log(scale).sum())

    def forward_grid(self, x: torch.Tensor, k: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on vectors as columns of ``x`` (dim, n) that run through every
        table row in order, image after image (``k`` from :meth:`inference_constants`).
        ``x`` is overwritten (its x2 rows take the coupling's output).
        Columns keep every element-wise step on long contiguous rows (as rows of d/2
        entries, tanh alone took a tenth of the flows' time). The hidden layer, 2·(d1 + code)
        wide against d, holds most of the work and most of it is passes over memory: the
        first product writes it, the condition's columns are added by broadcast in the
        same pass as the ReLU (no tiled copy of the condition), and the coupling updates
        x2 in place (no concatenation before the rotation)."""
        cond, w1, w2, b2, rot, off, log_scale = k
        h = torch.mm(w1, x[:self.d1])
        _add_relu_(h.view(h.shape[0], -1, cond.shape[1]), cond[:, None, :])
        a = torch.addmm(b2, w2, h)
        s = a[:self.d2].tanh_().mul_(self.clamp)
        x[self.d1:].mul_(torch.exp(s)).add_(a[self.d2:])
        return torch.addmm(off, rot, x), s.sum(0) + log_scale


def _add_relu_(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """h ← relu(h + c) in one pass where PyTorch has the fused kernel (its JIT's add+ReLU)."""
    op = getattr(torch.ops.aten, "_add_relu_", None)
    if op is not None:
        return op(h, c)
    return h.add_(c).relu_()


class ConditionalFlow(nn.Module):
    """A stack of conditional coupling blocks; :meth:`log_prob` gives log p(x) per vector."""

    def __init__(self, dim: int, cond_dim: int = 128, n_blocks: int = 8, clamp: float = 1.9,
                 hidden_factor: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.blocks = nn.ModuleList(
            ConditionalCouplingBlock(dim, cond_dim, gen, clamp, hidden_factor) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond``: (N, cond_dim), or (table (P, cond_dim), row index (N,)) for shared codes."""
        logdet = x.new_zeros(x.shape[0])
        for b in self.blocks:
            x, ld = b(x, cond)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x) under a standard normal base, z)."""
        z, logdet = self(x, cond)
        return -0.5 * self.dim * LOG_2PI - 0.5 * (z ** 2).sum(1) + logdet, z

    @torch.no_grad()
    def grid_log_prob(self, x: torch.Tensor, table: torch.Tensor, chunk: int = 4096, with_z: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`log_prob` for scoring (no autograd) of whole maps: ``x`` (B·P, dim) in
        (image, position) order, the code of position p in row p of ``table`` (P, cond_dim).
        The same values as ``log_prob(x, (table, arange(P).repeat(B)))`` at a fraction of
        the time: constants folded once per set of weights, and the rows taken a few images
        at a time through all blocks (the hidden layers' memory stays bounded). ``with_z``
        False: z is not gathered (None)."""
        P = table.shape[0]
        if x.shape[0] % P:
            raise ValueError(f"{x.shape[0]} vectors are not whole maps of {P} positions")
        consts = self._inference_constants(table)
        step = max(1, chunk // P) * P
        logps, zs = [], []
        for i in range(0, x.shape[0], step):
            z = x[i:i + step].t().clone(memory_format=torch.contiguous_format)  # a copy: blocks overwrite it
            logdet = z.new_zeros(z.shape[1])
            for b, k in zip(self.blocks, consts):
                z, ld = b.forward_grid(z, k)
                logdet += ld
            logps.append(-0.5 * self.dim * LOG_2PI - 0.5 * (z * z).sum(0) + logdet)
            if with_z:
                zs.append(z.t())
        return torch.cat(logps), torch.cat(zs) if with_z else None

    def _inference_constants(self, table: torch.Tensor) -> list[tuple]:
        """The blocks' folded constants, kept until a weight changes (training steps and
        loads change the parameters in place, which moves their version counters) or
        another table comes. Kept out of the module's registry: state dicts are unchanged."""
        key = (table.data_ptr(), tuple(table.shape), tuple((p.data_ptr(), p._version) for p in self.parameters()))
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            cached = (key, [b.inference_constants(table) for b in self.blocks])
            self.__dict__["_folded"] = cached
        return cached[1]

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

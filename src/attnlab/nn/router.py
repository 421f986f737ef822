"""Flux Attention's layer router (Qiu et al., arXiv 2604.07394): per layer and per sequence, choose
full attention or a sparse one from the layer's own queries.

    u      = mean over heads of the mean query over the first and the last ``pool`` tokens   [B, Dh]
    logit  = MLP(2Dh -> 4Dh -> Dh -> 1)(MLP(Dh -> 8Dh -> 2Dh)(u))        (SiLU; bias 4.5: start dense)
    train  : z = 1[z_soft > 0.5] + z_soft - stopgrad(z_soft),  z_soft = σ((logit + g) / τ), g logistic
             (the difference of two Gumbels: Gumbel-sigmoid, straight-through)
    eval   : z = 1[σ(logit / τ) > 0.5], and only the chosen branch runs for each sequence
    out    = z · full + (1 - z) · sparse

The queries are taken before RoPE, as in the reference code. Segment ranges for pooling (question /
context spans) are data-provided in the paper; we pool the whole sequence's ends (spec §9
resolution). The sparsity loss of a model is |1 - mean_layers(z) - target| (``sparsity_loss``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import registry


class Routed(NamedTuple):
    output: Tensor  # [B, T, dim]
    z: Tensor  # [B]: 1 = full attention, 0 = sparse (straight-through in training)


class FluxRouter(nn.Module):
    def __init__(self, head_dim: int, *, pool: int = 100, tau: float = 1.0, dense_bias: float = 4.5):
        super().__init__()
        if not 0 < tau:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        d = head_dim
        self.pool, self.tau = pool, tau
        self.features = nn.Sequential(nn.Linear(d, 8 * d), nn.SiLU(), nn.Linear(8 * d, 2 * d))
        self.head = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU(), nn.Linear(d, 1))
        nn.init.constant_(self.head[-1].bias, dense_bias)

    def logit(self, q: Tensor) -> Tensor:
        """q [B, H, T, Dh] (before RoPE) -> [B]."""
        T = q.shape[2]
        ends = q if T <= 2 * self.pool else torch.cat([q[:, :, : self.pool], q[:, :, -self.pool :]], 2)
        u = ends.mean(2).mean(1)  # [B, Dh]
        return self.head(F.silu(self.features(u))).squeeze(-1)

    def forward(self, q: Tensor) -> Tensor:
        """The routing decision z [B] in {0, 1}, with straight-through gradients in training."""
        logit = self.logit(q)
        if not self.training:
            return (torch.sigmoid(logit / self.tau) > 0.5).to(q.dtype)
        u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


class RoutedAttention(nn.Module):
    """An ``attnlab.nn.Attention`` whose mechanism is chosen per sequence between its own (full) and
    ``sparse`` by a ``FluxRouter``."""

    def __init__(self, attn: nn.Module, sparse: str, sparse_options: dict | None = None, **router_kwargs):
        super().__init__()
        self.attn = attn
        self.sparse, self.sparse_options = sparse, dict(sparse_options or {})
        registry.get(sparse)
        self.router = FluxRouter(attn.head_dim, **router_kwargs)
        self.force: float | None = None  # 1.0 / 0.0 pins the choice (analysis, tests)

    def _sparse(self, q, k, v) -> Tensor:
        a = self.attn
        return registry.attention(q, k, v, self.sparse, causal=a.causal, scale=a.scale, **self.sparse_options)

    def forward(self, x: Tensor) -> Routed:
        a = self.attn
        B, T, _ = x.shape
        q_pre = a.q_proj(x).view(B, T, a.heads, a.head_dim).transpose(1, 2)
        z = self.router(q_pre) if self.force is None else x.new_full((B,), self.force)
        q, k, v = a.project(x)

        def run(full: bool, rows: Tensor) -> Tensor:
            branch = a.attend if full else self._sparse
            return branch(q[rows], k[rows], v[rows])

        return Routed(a.merge_heads(mix(z, self.training, run)), z)


def mix(z: Tensor, training: bool, run) -> Tensor:
    """out = z·full + (1 − z)·sparse over the batch. ``run(full, rows)`` computes one branch for the
    sequences selected by the bool [B] ``rows``. Training runs both branches everywhere (gradients
    reach the router through z); inference runs, per sequence, only the chosen one."""
    every = torch.ones_like(z, dtype=torch.bool)
    if training:
        zz = z.view(-1, 1, 1, 1)
        return zz * run(True, every) + (1 - zz) * run(False, every)
    chosen = z > 0.5
    parts = {flag: run(flag, rows) for flag, rows in ((True, chosen), (False, ~chosen)) if rows.any()}
    first = next(iter(parts.values()))
    out = first.new_empty(z.shape[0], *first.shape[1:])
    for flag, part in parts.items():
        out[chosen if flag else ~chosen] = part
    return out


def sparsity_loss(z: list[Tensor], target: float) -> Tensor:
    """|model sparsity - target|, model sparsity = 1 - mean over routed layers and batch of z."""
    if not z:
        raise ValueError("sparsity_loss needs at least one routed layer")
    return (1 - torch.stack([zi.mean() for zi in z]).mean() - target).abs()

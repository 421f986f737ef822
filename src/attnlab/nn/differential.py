"""The differential attention layer: DIFF Transformer (Ye et al., "Differential Transformer", arXiv
2410.05258) and its grouped form GDA (Lim et al., "Grouped Differential Attention", arXiv 2510.06949).

Per layer, with H differential (signal) heads, H/G noise heads, Hkv key/value groups, map width d::

    λ        = exp(λq1 · λk1) − exp(λq2 · λk2) + λ_init          one scalar per layer, computed in fp32
    h_i      = (softmax(Q1_i K1ᵀ/√d) − λ softmax(Q2_⌊i/G⌋ K2ᵀ/√d)) V        [T, 2d]
    h_i      ← (1 − λ_init) · RMSNorm_2d(h_i)                    eps 1e-5, one affine weight shared by heads
    y        = concat_i(h_i) W_O
    λ_init   = 0.8 − 0.6 · exp(−0.3 · layer_idx)                 layer_idx 0-based ("unilm", the default)
             = 0.8 − 0.6 · exp(−0.3 · (layer_idx − 1))           ("motif": Motif-2's ports shift by one)

λq1, λk1, λq2, λk2 ∈ R^d start as N(0, 0.1²), so λ starts near λ_init. ``lambda_init=`` overrides the
schedule. G = ``groups`` (signal:noise = G:1); G = 1 is DIFF.

Projection layouts load the published checkpoints as they are: the query projection is read as
[H/G, G+1, d] per token, G signal heads then their group's noise head (Motif-2's stripe layout; for
G = 1 these are unilm's adjacent (Q1_i, Q2_i) pairs); keys as [Hkv, 2, d] (K1, K2 pairs); values as
[Hkv, 2d]. Spec §2C proposed a block layout with a permutation helper instead; reading the stripe
directly needs no helper and gives the same maps.

Under GQA the (K1, K2) pair of kv group g(i) serves the query pair (Q1_i, Q2_i), as the spec and
Motif-2 pair them. (unilm's code, given fewer kv heads, maps its 2H query heads onto the 2Hkv key
heads by plain GQA, which pairs some Q2 with a K1; its default is multi-head, where both readings
agree.) ``kv_heads`` defaults to H/G (GDA's k_ratio = 1: one key/value group per noise group; for
G = 1 this is unilm's multi-head default). G must divide H/Hkv so that a noise map never spans kv groups.
Left out: rotary embeddings (the paper rotates Q and K; :class:`attnlab.nn.Attention` owns RoPE),
KV caching, and DIFF V2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnlab.core import nonnegative_int, positive_int
from attnlab.mechanisms.differential import split_attention

SCHEDULES = ("unilm", "motif")


def lambda_init_for(layer_idx: int, schedule: str = "unilm") -> float:
    """λ_init for a 0-based layer index: 0.8 − 0.6·exp(−0.3·depth), depth = layer_idx ("unilm")
    or layer_idx − 1 ("motif")."""
    nonnegative_int("layer_idx", layer_idx)
    if schedule not in SCHEDULES:
        raise ValueError(f"lambda_init_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    depth = layer_idx if schedule == "unilm" else layer_idx - 1
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def _finite_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


class DifferentialAttention(nn.Module):
    """Differential (G = 1) or grouped differential (G > 1) self-attention: x [B, T, dim] -> [B, T, dim].

    heads: differential (signal) heads H; groups: signal heads per noise head G; kv_heads: key/value
    groups (default H/G); head_dim: map width d (default dim // (2H), the paper's choice, so that
    the value and output width per head is 2d).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        *,
        groups: int = 1,
        head_dim: int | None = None,
        layer_idx: int = 0,
        lambda_init: float | None = None,
        lambda_init_schedule: str = "unilm",
        causal: bool = True,
        bias: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        positive_int("groups", groups)
        if heads % groups:
            raise ValueError(f"groups={groups} must divide heads={heads} (signal:noise heads = G:1)")
        kv_heads = heads // groups if kv_heads is None else positive_int("kv_heads", kv_heads)
        if heads % kv_heads or (heads // kv_heads) % groups:
            raise ValueError(
                f"kv_heads={kv_heads} must divide heads={heads}, and groups={groups} must divide "
                f"heads/kv_heads, so that each noise map reads one kv group"
            )
        head_dim = dim // (2 * heads) if head_dim is None else head_dim
        positive_int("head_dim (dim // (2 * heads) by default)", head_dim)
        if lambda_init is None:
            lambda_init = lambda_init_for(layer_idx, lambda_init_schedule)
        elif not _finite_number(lambda_init):
            raise ValueError(f"lambda_init must be a finite float or None (the schedule), got {lambda_init!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.heads, self.kv_heads, self.groups, self.head_dim = heads, kv_heads, groups, head_dim
        self.lambda_init, self.causal = float(lambda_init), causal
        d, noise_heads = head_dim, heads // groups
        self.q_proj = nn.Linear(dim, (heads + noise_heads) * d, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * 2 * d, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * 2 * d, bias=bias)
        self.out_proj = nn.Linear(heads * 2 * d, dim, bias=bias)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.empty(d, dtype=torch.float32))  # host: parameter init
            for _ in range(4)
        )
        self.norm = nn.RMSNorm(2 * d, eps=eps, elementwise_affine=True)
        self.reset_lambda()

    def reset_lambda(self, std: float = 0.1) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=std)

    def lam(self) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a 0-d fp32 tensor (differentiable)."""
        a = torch.sum(self.lambda_q1.float() * self.lambda_k1.float())
        b = torch.sum(self.lambda_q2.float() * self.lambda_k2.float())
        return torch.exp(a) - torch.exp(b) + self.lambda_init

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"x must be [B, T, dim={self.q_proj.in_features}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, G, d = self.heads, self.kv_heads, self.groups, self.head_dim
        q = self.q_proj(x).view(B, T, H // G, G + 1, d)  # per group: G signal queries, then its noise query
        q_signal = q[:, :, :, :G].reshape(B, T, H, d).transpose(1, 2)  # [B, H, T, d]
        q_noise = q[:, :, :, G].transpose(1, 2)  # [B, H/G, T, d]
        k = self.k_proj(x).view(B, T, Hkv, 2, d).transpose(1, 2)  # [B, Hkv, T, 2, d]
        v = self.v_proj(x).view(B, T, Hkv, 2 * d).transpose(1, 2)  # [B, Hkv, T, 2d]
        h = split_attention(
            q_signal, q_noise, k[..., 0, :], k[..., 1, :], v, causal=self.causal, scale=d**-0.5, lam=self.lam()
        )  # [B, H, T, 2d]
        h = self.norm(h) * (1.0 - self.lambda_init)
        return self.out_proj(h.transpose(1, 2).reshape(B, T, H * 2 * d))

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_heads={self.kv_heads}, groups={self.groups}, head_dim={self.head_dim}, "
            f"lambda_init={self.lambda_init:.4f}, causal={self.causal}"
        )

"""The Dual-Stream Transformer block with channelized heads (Kerce, Fox; "The Dual-Stream Transformer:
Channelized Architecture for Interpretable Language Modeling", arXiv 2603.07461; spec §11).

The residual stream is split in two, each [B, L, dim] with dim = heads · d (one channel block of
width d per head):

    h   = CLN(x_t + x_e)                                    channel-aware LayerNorm, per head block
    q, k, v = P_q(h), P_k(h), P_v(h)                        head-mixing projections (below)
    x_t = x_t + P_o(attention(q, k, v; scale = α / sqrt(d)))   the token stream: attention only
    x_e = x_e + FFN(LayerNorm(x_t + x_e))                   the context stream: FFN only

Head mixing, the same strategy for P_q, P_k, P_v and P_o (the spec's resolution), each a map on the
concatenated channel blocks x = [x_1, …, x_H]:

* ``"independent"``: block-diagonal, y_h = W_h x_h. Heads never exchange information.
* ``"kronecker"``:  y_h = Σ_h' M[h, h'] W_h' x_h', i.e. W = (M ⊗ I_d) · blockdiag(W_1, …, W_H) with a
  learned scalar mixing matrix M [H, H] (initialized to I, so training starts independent).
* ``"dense"``: one full dim × dim matrix (the standard transformer).

The modes nest: Kronecker with M = I is independent, and dense holding (M ⊗ I_d)·blockdiag(W) is
Kronecker; the tests check both. **Attention amplification** α (``amplification``, default 1)
multiplies the attention logits, scale' = α · scale; the paper uses it at inference (α up to 16) to
probe whether heads select discretely. Set ``block.amplification = α`` on a trained block.

Readings we chose where the paper (no public code) and the spec leave it open:
* Kronecker keeps a per-head d × d map and adds the scalar mixing on top. The spec's bare
  ``W = M ⊗ I_d`` is the case W_h = I; without per-head maps q and k of a head would differ only by
  scalars, and "Kronecker with M = I" could not equal independent.
* Attention reads norm(x_t + x_e) and writes x_t; the FFN reads LayerNorm(x_t + x_e) after that update
  and writes x_e (spec's inferred resolution). CLN (LayerNorm over each head's d channels, with a
  per-channel affine) is used in every mode, so the modes differ only in their projections; a
  whole-vector LayerNorm would mix heads through its statistics and break independence.
* Projections have no bias, so each mode is exactly its matrix. The FFN is Linear → GELU → Linear
  with ``ffn_mult · dim`` hidden units. The attention core is any registered mechanism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import registry
from attnlab.core import positive_int

HEAD_MIXING = ("independent", "kronecker", "dense")


class ChannelNorm(nn.Module):
    """CLN: LayerNorm over each head's d channels separately, [..., H*d] -> [..., H*d]."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))  # host: parameter init
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))  # host: parameter init

    def forward(self, x: Tensor) -> Tensor:
        xh = F.layer_norm(x.unflatten(-1, (self.heads, self.head_dim)), (self.head_dim,), eps=self.eps)
        return (xh * self.weight + self.bias).flatten(-2)


class HeadMixing(nn.Module):
    """A bias-free dim -> dim projection over H channel blocks of width d, structured by ``mode``."""

    def __init__(self, heads: int, head_dim: int, mode: str):
        super().__init__()
        if mode not in HEAD_MIXING:
            raise ValueError(f"head_mixing must be one of {', '.join(map(repr, HEAD_MIXING))}, got {mode!r}")
        self.heads, self.head_dim, self.mode = heads, head_dim, mode
        dim = heads * head_dim
        if mode == "dense":
            self.weight = nn.Parameter(torch.empty(dim, dim).uniform_(-(dim**-0.5), dim**-0.5))  # host: parameter init
        else:
            # blocks[h] is head h's [d_out, d_in] map, initialized like nn.Linear(d, d)
            self.blocks = nn.Parameter(
                torch.empty(heads, head_dim, head_dim).uniform_(-(head_dim**-0.5), head_dim**-0.5)  # host: param init
            )
        if mode == "kronecker":
            # M[h, h']: how much head h reads head h'
            self.mix = nn.Parameter(torch.eye(heads))  # host: parameter init

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dense":
            return F.linear(x, self.weight)
        xh = x.unflatten(-1, (self.heads, self.head_dim))  # [..., H, d]
        y = torch.einsum("...hi,hoi->...ho", xh, self.blocks)  # per-head maps
        if self.mode == "kronecker":
            y = torch.einsum("gh,...hd->...gd", self.mix, y)  # scalar mixing across heads
        return y.flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, mode={self.mode!r}"


def _amplification(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"amplification must be a finite number > 0, got {alpha!r}")
    return float(alpha)


class DualStreamBlock(nn.Module):
    """One dual-stream layer: ``forward(x_t, x_e) -> (x_t, x_e)``, each [B, L, dim].

    ``head_mixing`` in {"independent", "kronecker", "dense"}; ``mechanism`` any registered name, its
    options as keywords; ``amplification`` α scales the logits (α · d^-0.5).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_mixing: str = "kronecker",
        mechanism: str = "dense",
        *,
        causal: bool = True,
        ffn_mult: int = 4,
        amplification: float = 1.0,
        **options,
    ):
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        positive_int("ffn_mult", ffn_mult)
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads (one channel block per head), got {dim} and {heads}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        self.mechanism = registry.get(mechanism).name  # unknown names raise, listing the valid ones
        self.heads, self.head_dim, self.causal, self.options = heads, dim // heads, causal, options
        self.amplification = amplification
        self.attn_norm = ChannelNorm(heads, self.head_dim)
        self.q, self.k, self.v, self.o = (HeadMixing(heads, self.head_dim, head_mixing) for _ in range(4))
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    @property
    def head_mixing(self) -> str:
        return self.q.mode

    @property
    def amplification(self) -> float:
        return self._amplification

    @amplification.setter
    def amplification(self, alpha: float) -> None:
        self._amplification = _amplification(alpha)

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, H*d] -> [B, H, L, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def qkv(self, x_t: Tensor, x_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention inputs, each [B, H, L, d]."""
        h = self.attn_norm(x_t + x_e)
        return self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))

    @property
    def scale(self) -> float:
        return self.amplification * self.head_dim**-0.5

    def attention_weights(self, x_t: Tensor, x_e: Tensor) -> Tensor:
        """The amplified attention map [B, H, L, L] (materialized: for analysis on small inputs)."""
        q, k, v = self.qkv(x_t, x_e)
        return registry.get(self.mechanism).weights(q, k, v, causal=self.causal, scale=self.scale, **self.options)

    def attend(self, x_t: Tensor, x_e: Tensor) -> Tensor:
        """The token-stream update P_o(attention(...)), [B, L, dim]."""
        q, k, v = self.qkv(x_t, x_e)
        o = registry.attention(q, k, v, self.mechanism, causal=self.causal, scale=self.scale, **self.options)
        return self.o(o.transpose(1, 2).flatten(-2))

    def forward(self, x_t: Tensor, x_e: Tensor) -> tuple[Tensor, Tensor]:
        if x_t.shape != x_e.shape or x_t.dim() != 3 or x_t.shape[-1] != self.heads * self.head_dim:
            dim = self.heads * self.head_dim
            raise ValueError(f"x_t and x_e must both be [B, L, {dim}], got {tuple(x_t.shape)} and {tuple(x_e.shape)}")
        x_t = x_t + self.attend(x_t, x_e)
        x_e = x_e + self.ffn(self.ffn_norm(x_t + x_e))
        return x_t, x_e

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, head_mixing={self.head_mixing!r}, "
            f"mechanism={self.mechanism!r}, causal={self.causal}, amplification={self.amplification}"
        )

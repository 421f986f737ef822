"""A learned input-independent attention layer, the "fixed sequence" relaxation of "Deconstructing
Attention" (Xue, Moosavi, Aletras; arXiv 2510.11602): the attention map is a parameter, not a
function of the input.

    P_h   = softmax over the allowed keys of L_h[:T, :T]     L: learned logits [H, max_len, max_len]
    out   = W_o · concat_h(P_h · x W_v^h)

The logits start at 0, so a fresh layer is the uniform average over the allowed keys (the
``fixed_pattern`` mechanism's default). The map is computed here and handed to the ``fixed_pattern``
mechanism as its ``weights`` (whose row renormalization then changes nothing); q and k do not exist,
so the mechanism gets zero-width stand-ins. Self-attention over L <= max_len tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab import registry
from attnlab.core import positive_int


class FixedPatternAttention(nn.Module):
    """x [B, L, dim] -> [B, L, dim] through a learned per-position map [H, L, L]."""

    def __init__(self, dim: int, heads: int, max_len: int, *, causal: bool = True, head_dim: int | None = None):
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        positive_int("max_len", max_len)
        if head_dim is None and dim % heads:
            raise ValueError(f"dim must be a multiple of heads when head_dim is not given, got {dim} and {heads}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        self.heads, self.max_len, self.causal = heads, max_len, causal
        self.head_dim = dim // heads if head_dim is None else positive_int("head_dim", head_dim)
        self.logits = nn.Parameter(torch.zeros(heads, max_len, max_len))  # host: parameter init
        self.v = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)

    def pattern(self, length: int) -> Tensor:
        """The attention map [H, L, L]: each row a softmax over its allowed keys."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"sequence length must be in [1, max_len={self.max_len}], got {length}")
        logits = self.logits[:, :length, :length]
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=logits.device).triu(1)
            logits = logits.masked_fill(future, float("-inf"))  # every row keeps its diagonal
        return torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.v.in_features:
            raise ValueError(f"x must be [B, L, {self.v.in_features}], got {tuple(x.shape)}")
        B, L, _ = x.shape
        v = self.v(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]
        stand_in = v.new_zeros(()).expand(B, self.heads, L, 1)  # q and k play no part
        p = self.pattern(L).to(v.dtype)
        out = registry.attention(stand_in, stand_in, v, "fixed_pattern", causal=self.causal, weights=p)
        return self.o(out.transpose(1, 2).flatten(-2))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, max_len={self.max_len}, causal={self.causal}"

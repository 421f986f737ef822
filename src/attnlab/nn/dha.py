"""``DecoupledHeadAttention``: an attention layer with per-layer key-head and value-head groupings
(DHA, Chen et al., "DHA: Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive
Heads Fusion", arXiv 2406.06567).

Query head h reads key head ``key_groups[h]`` and value head ``value_groups[h]``; the two groupings
are independent partitions of the query heads (spec §10.1). Identity groupings give MHA, contiguous
equal groups GQA, all zeros MQA. The KV cache per token is ``(Hk * D + Hv * Dv)`` numbers
(:attr:`DecoupledHeadAttention.kv_cache_width`).

The groupings are structure, not parameters: they are constructor arguments (shown in ``repr``) and
a state dict only loads into a module built with the same groupings. ``attnlab.convert.to_dha``
builds one from an MHA module.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlab.core import check_causal, positive_int
from attnlab.mechanisms import dha


def partition(name: str, groups, heads: int) -> tuple[int, ...]:
    """A grouping given without its kv-head count: it must use each of the kv heads 0..max."""
    groups = dha._normalize(name, groups)
    if not isinstance(groups, tuple):
        raise ValueError(f"{name} must be a sequence of {heads} kv-head indices here, got {groups!r}")
    return dha.resolve_groups(name, groups, heads, max(groups) + 1)


class DecoupledHeadAttention(nn.Module):
    """Projections for q (H heads), k (Hk heads), v (Hv heads) and o around DHA attention.

    Args:
        dim: model width (input and output).
        heads: query heads H.
        key_groups: H key-head indices (a partition over Hk = max + 1 key heads). Default: the GQA
            grouping over ``kv_heads``.
        value_groups: H value-head indices. Default: ``key_groups`` (K and V grouped alike).
        kv_heads: shorthand for contiguous GQA groupings when ``key_groups`` is None (default H, MHA).
        head_dim, value_head_dim: D and Dv (default ``dim // heads`` and D).
        bias: biases on the four projections.

    ``forward(x [B, T, dim], context [B, S, dim] = x, *, causal=False) -> [B, T, dim]``; causal is
    bottom-right aligned when S != T.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        key_groups=None,
        value_groups=None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dim, heads = positive_int("dim", dim), positive_int("heads", heads)
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}, or pass head_dim")
        self.head_dim = positive_int("head_dim", dim // heads if head_dim is None else head_dim)
        self.value_head_dim = positive_int("value_head_dim", value_head_dim or self.head_dim)
        if key_groups is not None and kv_heads is not None:
            raise ValueError("give kv_heads (contiguous GQA groups) or key_groups, not both")
        if key_groups is None:
            n = positive_int("kv_heads", heads if kv_heads is None else kv_heads)
            if heads % n:
                raise ValueError(f"heads={heads} must be a multiple of kv_heads={n} (or pass key_groups)")
            key_groups = tuple(h // (heads // n) for h in range(heads))
        self.dim, self.heads = dim, heads
        self.key_groups = partition("key_groups", key_groups, heads)
        self.value_groups = self.key_groups if value_groups is None else partition("value_groups", value_groups, heads)
        self.key_heads, self.value_heads = max(self.key_groups) + 1, max(self.value_groups) + 1
        D, Dv, f = self.head_dim, self.value_head_dim, {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(dim, heads * D, bias=bias, **f)
        self.k_proj = nn.Linear(dim, self.key_heads * D, bias=bias, **f)
        self.v_proj = nn.Linear(dim, self.value_heads * Dv, bias=bias, **f)
        self.o_proj = nn.Linear(heads * Dv, dim, bias=bias, **f)

    @property
    def kv_cache_width(self) -> int:
        """Cached numbers per token: Hk * D + Hv * Dv."""
        return self.key_heads * self.head_dim + self.value_heads * self.value_head_dim

    def forward(self, x: Tensor, context: Tensor | None = None, *, causal: bool = False) -> Tensor:
        check_causal(causal)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got {tuple(x.shape)}")
        src = x if context is None else context
        if src.dim() != 3 or src.shape[0] != x.shape[0] or src.shape[-1] != self.dim:
            raise ValueError(f"context must be [B={x.shape[0]}, S, dim={self.dim}], got {tuple(src.shape)}")
        B, T, S = x.shape[0], x.shape[1], src.shape[1]
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(src).view(B, S, self.key_heads, self.head_dim).transpose(1, 2)  # [B, Hk, S, D]
        v = self.v_proj(src).view(B, S, self.value_heads, self.value_head_dim).transpose(1, 2)  # [B, Hv, S, Dv]
        out = dha.attention(q, k, v, causal=causal, key_groups=self.key_groups, value_groups=self.value_groups).out
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.value_head_dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, key_groups={self.key_groups}, value_groups={self.value_groups}, "
            f"head_dim={self.head_dim}, value_head_dim={self.value_head_dim}"
        )

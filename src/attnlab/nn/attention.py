"""``attnlab.nn.Attention``: the drop-in attention layer (DESIGN §4). Projections, optional rotary
position embedding, and any registered mechanism behind ``attnlab.attention``.

    x [B, T, dim] (and kv [B, S, kv_dim] for cross attention) -> [B, T, dim]

* q/k/v/o are bias-free linear maps by default (``bias=True`` for all four). Keys and values have
  ``kv_heads`` heads (GQA/MQA when fewer than ``heads``); the head dim is ``dim // heads``.
* The mechanism's options are checked when the layer is built, with the registry's own check, so
  an unknown mechanism, an unknown option name or a bad value raises the registry's ValueError
  there and not in the middle of a forward. Values tied to the sequence length (a grid ``shape``,
  document ``lengths``, per-token ``groups``) are checked at the length they imply (see
  ``_probe_lengths``); every forward re-checks them against the actual length. Tensor-valued
  options are stored as given (not as buffers): put them on the input's device yourself.
* RoPE (``rope=True``) rotates q and k per head after projection. Default positions follow the
  library's causal alignment: keys sit at ``0..S-1`` and query row ``i`` at ``S - T + i``, so in self
  attention both are ``0..T-1`` and one new token with ``kv=`` the whole sequence is the last
  position (a decoding step without a cache); when T > S both shift up by T - S (RoPE only sees
  differences). Pass ``positions``/``kv_positions`` (each independently) to override.
* ``torch.compile(layer, fullgraph=True)`` works forward and backward, and ``dynamic=True`` compiles
  once for every length: the mechanism runs as one opaque op (``attnlab/compile.py``) and default
  RoPE positions are computed in the graph. Explicit ``positions`` are value-checked (non-negative),
  which breaks the graph.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from attnlab import registry
from attnlab.core import positive_int
from attnlab.nn.rope import RotaryEmbedding, check_positions


def _probe_lengths(options: dict) -> list[int]:
    """Sequence lengths at which to try the option check: the ones the options themselves imply (the
    product and the sum of an int tuple, a tensor's sizes, an int option) and a generic 64."""
    found = []
    for value in options.values():
        if isinstance(value, (tuple, list)) and value and all(isinstance(n, int) for n in value):
            found += [math.prod(value), sum(value)]
        elif isinstance(value, Tensor):
            found += list(value.shape)
        elif isinstance(value, int) and not isinstance(value, bool):
            found.append(value)
    return list(dict.fromkeys([n for n in found if 0 < n <= 1 << 20] + [64]))


def check_mechanism_options(mechanism: str, causal, options: dict) -> registry.Mechanism:
    """The registry's checks at build time: mechanism name, option names, the causal flag against the
    patterns the mechanism serves, and option values at a length they fit (first error wins)."""
    mech, causal_arg = registry.get(mechanism), causal
    causal = mech.is_causal(causal)  # per-axis bools (neighborhood) count as causal if any is
    if not any(p.endswith("_causal") == causal for p in mech.patterns):
        served = ", ".join(sorted(mech.patterns))
        raise ValueError(f"{mechanism} cannot run with causal={causal}; it supports: {served}")
    first = None
    for n in _probe_lengths(options):
        try:
            mech.resolve(n, n, causal_arg, options)
            return mech
        except ValueError as e:  # a length-bound value may only fit its own length: try the next
            first = first or e
    raise first


class Attention(nn.Module):
    """``Attention(dim, heads, kv_heads=None, mechanism="dense", *, rope=False, rope_base=10000.0,
    causal=False, bias=False, kv_dim=None, scale=None, **options)``.

    ``forward(x, kv=None, *, positions=None, kv_positions=None)``: x [B, T, dim], kv [B, S, kv_dim]
    (None: self attention), positions int [T] or [B, T] for the queries and kv_positions [S] or
    [B, S] for the keys (RoPE only) -> [B, T, dim].
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        mechanism: str = "dense",
        *,
        rope: bool = False,
        rope_base: float = 10000.0,
        causal: bool | tuple[bool, ...] = False,
        bias: bool = False,
        kv_dim: int | None = None,
        scale: float | None = None,
        **options,
    ):
        super().__init__()
        dim, heads = positive_int("dim", dim), positive_int("heads", heads)
        kv_heads = heads if kv_heads is None else positive_int("kv_heads", kv_heads)
        kv_dim = dim if kv_dim is None else positive_int("kv_dim", kv_dim)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads} (GQA)")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError(f"scale must be a number or None, got {scale!r}")
        self.mech = check_mechanism_options(mechanism, causal, options)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        self.mechanism, self.causal, self.scale, self.options = mechanism, causal, scale, dict(options)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def project(
        self, x: Tensor, kv: Tensor | None = None, positions: Tensor | None = None, kv_positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, T, Dh], k, v [B, Hkv, S, Dh], rotated when the layer has RoPE."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got {tuple(getattr(x, 'shape', ()))}")
        src = x if kv is None else kv
        kv_dim = self.k_proj.in_features
        if not isinstance(src, Tensor) or src.dim() != 3 or src.shape[-1] != kv_dim or src.shape[0] != x.shape[0]:
            raise ValueError(f"kv must be [B={x.shape[0]}, S, kv_dim={kv_dim}], got {tuple(getattr(src, 'shape', ()))}")
        B, T, _ = x.shape
        S = src.shape[1]
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(src).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        v = self.v_proj(src).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        if self.rope is not None:
            shift = max(T - S, 0)  # RoPE is relative: shift both so bottom-right positions are >= 0
            if positions is None:  # the offset form: no position tensor to check (and no graph break)
                q = self.rope(q, offset=S - T + shift)
            else:
                q = self.rope(q, check_positions("positions", positions, B, T))
            if kv_positions is None:
                k = self.rope(k, offset=shift)
            else:
                k = self.rope(k, check_positions("kv_positions", kv_positions, B, S))
        elif positions is not None or kv_positions is not None:
            raise ValueError("positions/kv_positions only apply to a layer built with rope=True")
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The mechanism: [B, H, T, Dh] per-head outputs."""
        return registry.attention(q, k, v, self.mechanism, causal=self.causal, scale=self.scale, **self.options)

    def merge_heads(self, o: Tensor) -> Tensor:
        """[B, H, T, Dh] -> o_proj -> [B, T, dim]."""
        B, H, T, Dh = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        kv_positions: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.project(x, kv, positions, kv_positions)
        return self.merge_heads(self.attend(q, k, v))

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))
        rope = f", rope_base={self.rope.base}" if self.rope is not None else ""
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, mechanism={self.mechanism!r}, "
            f"causal={self.causal}{rope}{opts}"
        )

"""Soft mixture of attention experts, as in BAM (Zhang et al., "BAM! Just Like That: Simple and
Efficient Parameter Upcycling for Mixture of Experts", arXiv 2408.08274, NeurIPS 2024).

Each of E experts is a full attention with its own query, key, value and output projections; a
router mixes them per token with soft (dense) weights, so every expert runs on every token:

    g(x_t)  = softmax(x_t W_r)                       [E]    per token
    out_t   = Σ_e g_e(x_t) · W_o^e · Attn_e(x W_q^e, x W_k^e, x W_v^e)_t

``share_kv=True`` is BAM's KV-sharing variant: one key and one value projection serve all experts
(the experts keep their own queries and outputs), which makes the KV cache the size of one expert's.

Each expert's attention is a registered mechanism (``mechanism=`` a name with its options as
keywords for all experts, or one entry per expert: a name or a ``(name, options)`` pair). When every
expert runs the same mechanism, all experts go through one attention call: their query heads are
stacked (expert-major, each expert on its own kv heads; head-major when the kv heads are shared, so
the library's GQA map ``i // (E·H/Hkv)`` sends every expert's head h to the shared kv head
``h // (H/Hkv)``); per-kv-head patterns, tensor-valued options and (shared kv) data-dependent
selections run one call per expert. The gated sum is one matmul: the output projection runs on
the gate-scaled concatenation of the experts' heads.

Readings we chose: the router is a bias-free linear map over the layer input, with soft routing
(no top-k, no load-balance loss: BAM's attention experts are soft, so none is needed); BAM's
parallel-attention block and its upcycling from dense checkpoints are outside this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnlab import registry
from attnlab.core import positive_int


def _experts_spec(mechanism, options: dict, experts: int) -> list[tuple[str, dict]]:
    """(name, options) per expert; names are checked against the registry here."""
    if isinstance(mechanism, str):
        return [(registry.get(mechanism).name, dict(options))] * experts
    if not isinstance(mechanism, Sequence) or len(mechanism) != experts:
        got = len(mechanism) if isinstance(mechanism, Sequence) else type(mechanism).__name__
        raise ValueError(f"mechanism must be a name or a sequence of {experts} entries (one per expert), got {got}")
    if options:
        raise ValueError("with one mechanism per expert, give options as (name, options) pairs, not as keywords")
    spec = []
    for entry in mechanism:
        if isinstance(entry, str):
            entry = (entry, {})
        if not (isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str)) or not isinstance(
            entry[1], dict
        ):
            raise ValueError(f"each per-expert mechanism must be a name or a (name, options dict) pair, got {entry!r}")
        spec.append((registry.get(entry[0]).name, dict(entry[1])))
    return spec


class MixtureOfAttention(nn.Module):
    """x [B, L, dim] -> [B, L, dim]: E attention experts mixed per token by a softmax router."""

    def __init__(
        self,
        dim: int,
        heads: int,
        experts: int,
        kv_heads: int | None = None,
        mechanism: str | Sequence = "dense",
        *,
        share_kv: bool = False,
        causal: bool = False,
        head_dim: int | None = None,
        **options,
    ):
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        positive_int("experts", experts)
        kv_heads = heads if kv_heads is None else positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
        if head_dim is None and dim % heads:
            raise ValueError(f"dim must be a multiple of heads when head_dim is not given, got {dim} and {heads}")
        head_dim = dim // heads if head_dim is None else positive_int("head_dim", head_dim)
        for flag, value in (("share_kv", share_kv), ("causal", causal)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be a bool, got {value!r}")
        self.spec = _experts_spec(mechanism, options, experts)
        # Stacking the experts' heads into one call is exact when the mechanism treats heads alike:
        # not for per-kv-head patterns, tensor options that may carry a head axis, or (shared kv)
        # data-dependent selections, which would pool the experts' queries of one kv head.
        mech, opts = registry.get(self.spec[0][0]), self.spec[0][1]
        self._one_call = isinstance(mechanism, str) and not mech.per_kv_head
        self._one_call &= not any(isinstance(o, torch.Tensor) for o in opts.values())
        self._one_call &= not (share_kv and mech.select is not None)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.experts, self.share_kv, self.causal = experts, share_kv, causal
        kv_sets = 1 if share_kv else experts
        self.router = nn.Linear(dim, experts, bias=False)
        self.q = nn.Linear(dim, experts * heads * head_dim, bias=False)  # rows expert-major: [E, H, d]
        self.k = nn.Linear(dim, kv_sets * kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_sets * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(experts * heads * head_dim, dim, bias=False)  # columns expert-major: [E, H, d]

    def gates(self, x: Tensor) -> Tensor:
        """Router weights [B, L, E], summing to 1 per token."""
        return torch.softmax(self.router(x), dim=-1)

    def _attend(self, x: Tensor) -> Tensor:
        """Every expert's attention output, [B, L, E, H*d] (before the output projection)."""
        B, L, _ = x.shape
        E, H, Hkv, d = self.experts, self.heads, self.kv_heads, self.head_dim
        q = self.q(x).view(B, L, E, H, d)
        k = self.k(x).view(B, L, -1, Hkv, d)  # [B, L, 1 or E, Hkv, d]
        v = self.v(x).view(B, L, -1, Hkv, d)
        if self._one_call:
            name, opts = self.spec[0]
            if self.share_kv:  # head-major query heads (h, e): GQA sends each to kv head h // (H/Hkv)
                qs = q.permute(0, 3, 2, 1, 4).reshape(B, H * E, L, d)
            else:  # expert-major (e, h) over expert-major kv heads (e, j)
                qs = q.permute(0, 2, 3, 1, 4).reshape(B, E * H, L, d)
            ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(B, -1, L, d) for t in (k, v))
            o = registry.attention(qs, ks, vs, name, causal=self.causal, **opts).view(
                B, -1, E if self.share_kv else H, L, d
            )
            o = o.permute(0, 3, 2, 1, 4) if self.share_kv else o.permute(0, 3, 1, 2, 4)  # -> [B, L, E, H, d]
            return o.reshape(B, L, E, H * d)
        outs = []
        for e, (name, opts) in enumerate(self.spec):
            j = 0 if self.share_kv else e
            qe, ke, ve = (t[:, :, i].transpose(1, 2) for t, i in ((q, e), (k, j), (v, j)))
            outs.append(registry.attention(qe, ke, ve, name, causal=self.causal, **opts).transpose(1, 2).flatten(-2))
        return torch.stack(outs, dim=2)

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Each expert's own output W_o^e · Attn_e, [B, L, E, dim] (for analysis and tests)."""
        o = self._attend(x)  # [B, L, E, H*d]
        w = self.o.weight.view(self.dim, self.experts, -1)  # [dim, E, H*d]
        return torch.einsum("blef,def->bled", o, w)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, {self.dim}], got {tuple(x.shape)}")
        o = self._attend(x) * self.gates(x).unsqueeze(-1)  # [B, L, E, H*d], gate-scaled
        return self.o(o.flatten(-2))  # Σ_e W_o^e (g_e o_e) in one matmul

    def extra_repr(self) -> str:
        names = sorted({n for n, _ in self.spec})
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"experts={self.experts}, share_kv={self.share_kv}, causal={self.causal}, mechanism={names}"
        )

"""Decoupled-head attention: GQA with arbitrary, K/V-independent head groupings (DHA, Chen et al.,
"DHA: Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive Heads Fusion",
arXiv 2406.06567, NeurIPS 2024).

The runtime rule (spec §10.1), for query head h with key grouping ``c_K`` and value grouping ``c_V``::

    O_h = softmax(scale * Q_h K_{c_K(h)}^T + M) V_{c_V(h)}

``key_groups[h] = c_K(h)`` indexes the Hk key heads and ``value_groups[h] = c_V(h)`` the Hv value
heads; the two groupings are independent, need not be contiguous, and may have unequal group sizes.
MHA is the identity grouping, GQA the contiguous one (h // (H / Hkv), spec §0), MQA all zeros.

Fast path: query heads that share both a key head and a value head form one *pair group*. Pair groups
of equal size g go to one dense call as GQA with g query heads per (gathered) kv head, so the number
of dense calls is the number of distinct group sizes (one for MHA, GQA, MQA and any permutation;
contiguous GQA gathers nothing). Only the kv heads each call reads are gathered (at most one per
pair group, never T x S). On CPU, groupings that need several calls run as one call on per-head
gathered k/v instead: the CPU kernel repeats kv heads for GQA anyway, so memory is the same and one
call is faster. The dense call is PyTorch's fused SDPA, or the block-sparse executor for
bottom-right causal cross-attention. Off the CPU public SDPA returns no LSE, so ``attention_lse``
there takes the ``blocksparse`` impl: the same plan with every dense call on the executor.

Grouping options (each of ``key_groups`` and ``value_groups``):

* ``None`` or ``"contiguous"``: the GQA order ``h // (H / n)``; needs H % n == 0.
* ``"strided"``: ``h % n`` (consecutive query heads use different kv heads).
* a sequence of H ints: an explicit grouping. It must map every query head to an existing kv head
  and use every kv head (a partition of the query heads into n non-empty groups). [inferred: the
  spec asks for partitions; an unused kv head would be dead cache, so we refuse it.]

Through ``attnlab.attention(..., "dha")`` k and v must have the same head count (the library's q, k,
v contract); call :func:`attention` directly for Hk != Hv.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import FLOAT_DTYPES, AttentionOutput
from attnlab.mechanisms import dense
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"key_groups": None, "value_groups": None}
NAMED = ("contiguous", "strided")
GATHER_ON_CPU = True  # one call on gathered k/v when a grouping needs several (tests flip it)


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    """Normalize each grouping to None, a name, or a tuple of ints (checked against H at call time)."""
    return {name: _normalize(name, opts[name]) for name in DEFAULTS}


def _normalize(name: str, groups):
    if groups is None or (isinstance(groups, str) and groups in NAMED):
        return groups
    if isinstance(groups, str):
        raise ValueError(f"{name} must be None, {' or '.join(map(repr, NAMED))}, or a sequence of ints; got {groups!r}")
    if isinstance(groups, Tensor):
        if groups.dim() != 1 or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"{name} as a tensor must be 1-D integer, got {groups.dtype} {tuple(groups.shape)}")
        groups = groups.tolist()
    if not isinstance(groups, (tuple, list)) or not groups:
        raise ValueError(f"{name} must be a non-empty sequence of kv-head indices, one per query head; got {groups!r}")
    for g in groups:
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"{name} entries must be non-negative ints (kv-head indices), got {groups!r}")
    return tuple(groups)


def resolve_groups(name: str, groups, H: int, n: int) -> tuple[int, ...]:
    """The grouping as a tuple of H kv-head indices covering all n kv heads, or a ValueError."""
    groups = _normalize(name, groups)
    if groups is None or groups == "contiguous":
        if n == 0 or H % n:
            raise ValueError(
                f"{name}=contiguous needs the {H} query heads to be a multiple of the {n} kv heads; "
                "pass an explicit grouping"
            )
        return tuple(h // (H // n) for h in range(H))
    if groups == "strided":
        groups = tuple(h % n for h in range(H)) if n else ()
    if len(groups) != H:
        raise ValueError(f"{name} must give one kv head per query head (length {H}), got length {len(groups)}")
    bad = [g for g in groups if g >= n]
    if bad:
        raise ValueError(f"{name} must index the {n} kv heads 0..{n - 1}, got {bad[0]}")
    unused = sorted(set(range(n)) - set(groups))
    if unused:
        raise ValueError(
            f"{name} must partition the query heads over all {n} kv heads (each used at least once); "
            f"kv head(s) {unused} unused"
        )
    return groups


class Bucket(NamedTuple):
    """One dense call: ``len(keys)`` pair groups of ``g`` query heads each, pair-major."""

    heads: tuple[int, ...]  # query heads, the g heads of pair 0, then of pair 1, ...
    keys: tuple[int, ...]  # the key head of each pair
    values: tuple[int, ...]  # the value head of each pair


@functools.lru_cache(maxsize=256)
def plan(key_groups: tuple[int, ...], value_groups: tuple[int, ...]) -> tuple[tuple[Bucket, ...], tuple | None]:
    """Buckets of equal-size pair groups, and the permutation that restores head order (None if
    the buckets already list the heads in order)."""
    members: dict[tuple[int, int], list[int]] = {}
    for h, pair in enumerate(zip(key_groups, value_groups)):
        members.setdefault(pair, []).append(h)
    by_size: dict[int, list[tuple[int, int]]] = {}
    for pair, heads in members.items():
        by_size.setdefault(len(heads), []).append(pair)
    buckets = tuple(
        Bucket(tuple(h for p in pairs for h in members[p]), tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
        for pairs in by_size.values()
    )
    order = [h for b in buckets for h in b.heads]
    if order == sorted(order):
        return buckets, None
    inverse = [0] * len(order)
    for pos, h in enumerate(order):
        inverse[h] = pos
    return buckets, tuple(inverse)


def _take(x: Tensor, idx: tuple[int, ...]) -> Tensor:
    """x[:, idx] without a copy when idx is every head in order."""
    if len(idx) == x.shape[1] and idx == tuple(range(len(idx))):
        return x
    return x.index_select(1, torch.tensor(idx, device=x.device))


def _dense(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale) -> AttentionOutput:
    if dense.sdpa_supports(q, k, v, causal) is None:
        return dense.sdpa(q, k, v, causal=causal, scale=scale)
    return dense.blocksparse(q, k, v, causal=causal, scale=scale)


def _executor(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale) -> AttentionOutput:
    return dense.blocksparse(q, k, v, causal=causal, scale=scale)


def sdpa_supports(q: Tensor, k: Tensor, v: Tensor, causal: bool, need_lse: bool = False, **_) -> str | None:
    if need_lse and q.device.type != "cpu":
        return "public SDPA returns no log-sum-exp off CPU"
    return None


def check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The SDPA layout with independent head counts: q [B,H,T,D], k [B,Hk,S,D], v [B,Hv,S,Dv]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a 4-D floating tensor [B, heads, length, dim], got {t.dtype} {t.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share a dtype and a device")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[2] != v.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"expected q [B,H,T,D], k [B,Hk,S,D], v [B,Hv,S,Dv], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_groups=None,
    value_groups=None,
) -> AttentionOutput:
    """q [B,H,T,D], k [B,Hk,S,D], v [B,Hv,S,Dv] -> out [B,H,T,Dv], lse [B,H,T] (lse None off CPU).

    Query head h attends with key head ``key_groups[h]`` and value head ``value_groups[h]``.
    """
    return _grouped(q, k, v, causal, scale, key_groups, value_groups, _dense)


def blocksparse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_groups=None,
    value_groups=None,
) -> AttentionOutput:
    """:func:`attention` with every dense call on the executor: an LSE on every device."""
    return _grouped(q, k, v, causal, scale, key_groups, value_groups, _executor)


def _grouped(q, k, v, causal, scale, key_groups, value_groups, run) -> AttentionOutput:
    """The pair-group plan (module docstring), each bucket one ``run(q, k, v, causal, scale)``."""
    check_shapes(q, k, v)
    kg = resolve_groups("key_groups", key_groups, q.shape[1], k.shape[1])
    vg = resolve_groups("value_groups", value_groups, q.shape[1], v.shape[1])
    buckets, inverse = plan(kg, vg)
    if len(buckets) > 1 and q.device.type == "cpu" and GATHER_ON_CPU:
        # The CPU kernel repeats kv heads for GQA anyway, so one call on per-head gathered k/v holds
        # the same memory, and it measured ~20% faster than one call per group size (2 cores, T=4K).
        buckets, inverse = (Bucket(tuple(range(q.shape[1])), kg, vg),), None
    parts = [run(_take(q, b.heads), _take(k, b.keys), _take(v, b.values), causal, scale) for b in buckets]
    out = torch.cat([p.out for p in parts], dim=1) if len(parts) > 1 else parts[0].out  # [B, H, T, Dv], bucketed
    lse = None if any(p.lse is None for p in parts) else torch.cat([p.lse for p in parts], dim=1)
    if inverse is not None:
        idx = torch.tensor(inverse, device=q.device)
        out = out.index_select(1, idx)
        lse = None if lse is None else lse.index_select(1, idx)
    return AttentionOutput(out, lse)


def oracle(q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, key_groups=None, value_groups=None):
    """Dense oracle: gather each query head's own key and value head, then plain MHA (materializes
    [B, H, T, S] weights; computes in fp32, fp64 when given fp64)."""
    check_shapes(q, k, v)
    kg = resolve_groups("key_groups", key_groups, q.shape[1], k.shape[1])
    vg = resolve_groups("value_groups", value_groups, q.shape[1], v.shape[1])
    k_per_head = k[:, list(kg)]  # [B, H, S, D]
    v_per_head = v[:, list(vg)]  # [B, H, S, Dv]
    return _reference.attention(q, k_per_head, v_per_head, causal=causal, scale=scale)


def mask(T: int, S: int, *, causal: bool = False, key_groups=None, value_groups=None) -> Tensor:
    """bool [T, S]: every head attends densely (bottom-right causal); groupings only route heads."""
    return dense.mask(T, S, causal=causal)


SPEC = Mechanism(
    "dha",
    "DHA (decoupled-head attention), arXiv 2406.06567",
    Kind.COMPOSITE,  # dense per head; the groupings route query heads to kv heads: its own oracle
    {"grouped_sdpa": Impl(attention, sdpa_supports, traced=True), "blocksparse": Impl(blocksparse)},
    check_options,
    DEFAULTS,
    example=lambda S: {"key_groups": "strided", "value_groups": "contiguous"},
    # decoupled groupings; under GQA shapes they differ and the gather path runs
    workloads=Workloads(efficiency=lambda T: {"key_groups": "strided", "value_groups": "contiguous"}),
    mask=mask,
    oracle=oracle,
)

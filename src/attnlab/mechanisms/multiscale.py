"""Hierarchical multi-scale attention: near keys at full resolution, far keys average-pooled, in one
softmax (the idea of H-Transformer-1D, Zhu & Soricut, arXiv 2107.11906, and of the coarse-far /
fine-near patterns of Focal Transformer, arXiv 2107.00641, written as an exact rule).

Keys are pooled at levels 1..L by factors ``pools = (f_1, f_2, ...)``, each a multiple of the last;
level 0 is the raw keys. Let d(j) be the distance of key j from the query position p = i + S - T
(p - j when causal, |p - j| otherwise), and reach_0 = ``window``, reach_l = window * f_l. A pooled
block B of level l is *far* when every member lies at distance >= reach_{l-1} (causal: and in the
past). Far-ness is inherited upward (a far block's children are far), so for each key the far levels
form a prefix 1..m, and the key is represented exactly once:

  * by its level-m block when m >= 1 (a far block whose parent is not far, or the last level);
  * by itself when m = 0 (its level-1 block is not far, i.e. "near"; causal keeps j <= p).

The query attends, in one softmax, to its near raw keys and to the pooled keys (mean of the block's
keys and of its values) of its far blocks. Cost per query: O(window + sum_l reach_l / f_{l-1}) instead
of O(S). Pooled keys carry no log(count) logit bonus: a block counts as one key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, positive_int
from attnlab.kernels import block_sizes, block_sparse_attention, build_layout
from attnlab.kernels.layout import cached_layout, query_positions
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"window": 128, "pools": (8, 64)}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    window = positive_int("window", opts["window"])
    pools = opts["pools"]
    pools = (pools,) if isinstance(pools, int) and not isinstance(pools, bool) else pools
    if not isinstance(pools, (tuple, list)) or not pools:
        raise ValueError(f"pools must be a non-empty tuple of ints, got {opts['pools']!r}")
    prev = 1
    for f in pools:
        positive_int("pools entries", f)
        if f <= prev or f % prev:
            raise ValueError(f"pools must increase and each divide the next (nested blocks), got {tuple(pools)}")
        prev = f
    return {"window": window, "pools": tuple(pools)}


def pool_levels(x: Tensor, pools: tuple[int, ...]) -> Tensor:
    """[B, h, S, E] -> [B, h, S + sum_l ceil(S / f_l), E]: raw tokens, then each level's block means."""
    S = x.shape[2]
    out = [x]
    for f in pools:
        n = math.ceil(S / f)
        sums = F.pad(x, (0, 0, 0, n * f - S)).unflatten(2, (n, f)).sum(3)
        counts = torch.clamp(S - torch.arange(n, device=x.device) * f, max=f).view(1, 1, n, 1)
        out.append(sums / counts.to(x.dtype))
    return torch.cat(out, dim=2)


def _offsets(S: int, pools) -> list[int]:
    """Start of each level in the concatenated key axis: [0, S, S + S/f1, ...]."""
    off = [0, S]
    for f in pools[:-1]:
        off.append(off[-1] + math.ceil(S / f))
    return off


def _far(p: Tensor, start: Tensor, end: Tensor, reach: int, causal: bool) -> Tensor:
    """Every member of [start, end) at distance >= reach from p (and in the past when causal)."""
    if causal:
        return end - 1 <= p - reach
    return (end - 1 <= p - reach) | (start >= p + reach)


def _mask_mod(T: int, S: int, causal: bool, window: int, pools):
    off, levels = S - T, _offsets(S, pools)
    reach = [window] + [window * f for f in pools]

    def multiscale(b, h, q_idx, kv_idx):
        p = q_idx + off
        level = sum((kv_idx >= o).long() for o in levels[1:])  # 0 = raw keys, l = level l
        allowed = None  # built from the indices only, so it lives on their device (and traces under vmap)
        for lv in range(len(pools) + 1):
            f = 1 if lv == 0 else pools[lv - 1]
            blk = kv_idx - levels[lv]  # index within the level
            start, end = blk * f, torch.clamp((blk + 1) * f, max=S)
            if lv == 0:  # a raw key is used when its level-1 block is not far
                f1 = pools[0]
                near = ~_far(p, (blk // f1) * f1, torch.clamp((blk // f1 + 1) * f1, max=S), window, causal)
                ok = near & (blk <= p) if causal else near
            else:
                ok = _far(p, start, end, reach[lv - 1], causal)
                if lv < len(pools):  # unless the parent block is far too
                    g = pools[lv]
                    ok = ok & ~_far(p, (start // g) * g, torch.clamp((start // g + 1) * g, max=S), reach[lv], causal)
            term = (level == lv) & ok
            allowed = term if allowed is None else allowed | term
        return allowed & (p >= 0)

    return multiscale


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], window: int, pools: tuple[int, ...]):
    """The layout over the raw-then-pooled key axis (a pooled key counts as one key)."""
    levels = _offsets(S, pools)
    total = levels[-1] + math.ceil(S / pools[-1])
    first, last = query_positions(T, S, block[0])
    f1 = pools[0]
    # raw keys lie within window + f1 of the block's positions; pooled levels are searched whole
    ranges = [
        (first - window - f1, last + 1 + (0 if causal else window + f1)),
        (torch.full_like(first, S), torch.full_like(first, total)),
    ]
    return build_layout(_mask_mod(T, S, causal, window, pools), T, total, key_ranges=ranges, block=block)


def mask(T: int, S: int, *, causal: bool, window: int, pools: tuple[int, ...]) -> Tensor:
    """bool [T, S + sum_l ceil(S / f_l)] over the raw-then-pooled key axis, written per token: find
    each key's coarsest far level directly."""
    reach = [window] + [window * f for f in pools]
    p = (torch.arange(T) + S - T).view(T, 1)  # host: dense oracle mask
    j = torch.arange(S).view(1, S)  # host: dense oracle mask
    covered_by = torch.zeros(T, S, dtype=torch.long)  # host: dense oracle mask; the level representing key j
    for lv, f in enumerate(pools, start=1):
        start = (j // f) * f
        end = torch.clamp(start + f, max=S)
        covered_by = torch.where(_far(p, start, end, reach[lv - 1], causal), lv, covered_by)
    parts = [(covered_by == 0) & ((j <= p) if causal else True)]
    for lv, f in enumerate(pools, start=1):
        n = math.ceil(S / f)
        blocks = torch.zeros(T, n, dtype=torch.bool)  # host: dense oracle mask
        hit = covered_by == lv
        blocks.scatter_reduce_(1, (j // f).expand(T, S), hit, "amax")
        parts.append(blocks)
    return torch.cat(parts, dim=1) & (p >= 0)


def oracle(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale=None, window: int, pools: tuple[int, ...]):
    """Dense attention over the raw-then-pooled keys under ``mask``."""
    m = mask(q.shape[2], k.shape[2], causal=causal, window=window, pools=pools)
    return _reference.attention(q, pool_levels(k, pools), pool_levels(v, pools), m.to(q.device), scale=scale)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None, window: int, pools: tuple[int, ...]
) -> AttentionOutput:
    """The executor over the raw keys and their pooled levels, under ``layout``."""
    block = block_sizes(q.device)
    lay = layout(q.shape[2], k.shape[2], causal=causal, block=block, device=q.device, window=window, pools=pools)
    return block_sparse_attention(q, pool_levels(k, pools), pool_levels(v, pools), lay, scale=scale)


SPEC = Mechanism(
    "multiscale",
    "hierarchical multi-scale attention: H-Transformer-1D arXiv 2107.11906; Focal arXiv 2107.00641",
    Kind.COMPOSITE,  # one softmax, but over the keys and their pooled levels: its own oracle
    {"blocksparse": Impl(attention)},
    check_options,
    DEFAULTS,
    example=lambda S: {"window": 3, "pools": (2, 4)},
    workloads=Workloads(quality=lambda L: {"window": L // 8, "pools": (4, 16)}, reach="window"),
    mask=mask,
    layout=layout,
    oracle=oracle,
)

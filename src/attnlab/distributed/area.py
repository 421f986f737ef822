"""Allowed-area measure and MagiAttention-style area-balanced sharding.

Under a mask, a query row's cost is the number of keys it may see. ``row_area`` counts that exactly
from the mechanism's block layout: a full block adds its width to each of its rows, a partial block
evaluates the predicate over that one block only, so the count never costs T x S. ``balanced`` cuts
the query axis at block boundaries where the prefix sum of the area crosses equal shares (the greedy
area-balanced dispatch of MagiAttention, restricted to one contiguous range per rank).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.distributed.sharding import Sharding, check_sizes
from attnlab.kernels import BlockLayout, block_size
from attnlab.registry import get


def _layout(T: int, mechanism: str, causal, block: int | None, options: dict) -> BlockLayout:
    """The mechanism's self-attention layout for T tokens, with query blocks of ``block`` if given."""
    mech = get(mechanism)
    if mech.layout is None:
        raise ValueError(
            f"{mech.name} is a {mech.kind.value} mechanism with no fixed block layout, so its per-rank "
            "cost is not known before the data: shard it with contiguous(...) or zigzag(...)"
        )
    tiles = block_size(block) if block is not None else contextlib.nullcontext()
    with tiles:
        return mech.block_layout(T, T, causal=causal, **options)


def _rows(lay: BlockLayout) -> Tensor:
    """Allowed keys per query row [T] (int64, layout order), summed over the layout's slices."""
    Bq, Bk, T, S, dev = lay.block_q, lay.block_k, lay.T, lay.S, lay.device
    nQB = lay.n_q_blocks
    counts = torch.zeros(nQB * Bq, dtype=torch.int64, device=dev)  # [nQB * Bq], padded rows stay 0
    for b in range(lay.kv_blocks.shape[0]):
        for h in range(lay.kv_blocks.shape[1]):
            kvb, part = lay.kv_blocks[b, h], lay.partial[b, h]  # [nQB, V]
            width = torch.clamp((kvb + 1) * Bk, max=S) - kvb * Bk  # keys in each visited block
            full = torch.where((kvb >= 0) & ~part, width, 0).sum(1)  # [nQB]: keys of full blocks per row
            counts += full.repeat_interleave(Bq)
            bt, ht = torch.tensor(b, device=dev), torch.tensor(h, device=dev)
            for n, j in zip(*torch.nonzero(part, as_tuple=True)):
                n, kb = int(n), int(kvb[n, j])
                qi = torch.arange(n * Bq, min((n + 1) * Bq, T), device=dev)  # [rows]
                ki = torch.arange(kb * Bk, min((kb + 1) * Bk, S), device=dev)  # [cols]
                counts[qi] += lay.mask_mod(bt, ht, qi.unsqueeze(1), ki.unsqueeze(0)).sum(1)
    return counts[:T]


def row_area(T: int, mechanism: str, causal=False, **options) -> Tensor:
    """Allowed keys of each query row of a T-token self-attention [T] (int64, host, token order).

    Summed over the batch rows / kv heads when the mask differs per slice.
    """
    lay = _layout(T, mechanism, causal, None, options)
    rows = _rows(lay)
    # A grid layout is written in a permuted token order: slot t holds token order[t].
    return rows if lay.order is None else rows.index_select(0, torch.argsort(lay.order))


def area(sharding: Sharding, mechanism: str, causal=False, **options) -> Tensor:
    """The allowed (query, key) area covered by each rank's queries [W] (int64, host)."""
    if not isinstance(sharding, Sharding):
        raise ValueError(f"sharding must be a Sharding, got {type(sharding).__name__}")
    rows = row_area(sharding.length, mechanism, causal, **options)  # [T]
    return torch.stack([rows[sharding.positions(r, device=rows.device)].sum() for r in range(sharding.world)])


def imbalance(sharding: Sharding, mechanism: str, causal=False, **options) -> float:
    """max / mean of :func:`area`: 1.0 is perfectly balanced; the slowest rank sets the step time."""
    per_rank = area(sharding, mechanism, causal, **options).double()  # [W]
    mean = float(per_rank.mean())
    return float(per_rank.max()) / mean if mean > 0 else 1.0


def balanced(T: int, world: int, mechanism: str, causal=False, block: int | None = None, **options) -> Sharding:
    """One contiguous range per rank, each with about 1/W of the mask's allowed area.

    Cuts fall on query-block boundaries of the mechanism's layout (``block`` query rows; default the
    host tile of ``kernels.block_sizes()``): cut r is the boundary whose area prefix sum is closest
    to r/W of the total, keeping at least one block for every rank. Finer blocks balance better.
    """
    check_sizes(T, world)
    lay = _layout(T, mechanism, causal, block, options)
    if lay.order is not None:
        raise ValueError(f"{mechanism} permutes tokens into a grid order; shard it with contiguous(...) or zigzag(...)")
    Bq, nQB = lay.block_q, lay.n_q_blocks
    if nQB < world:
        msg = f"balanced cuts at query blocks of {Bq}: T={T} has {nQB} for world={world}; pass a smaller block="
        raise ValueError(msg)
    rows = F.pad(_rows(lay), (0, nQB * Bq - T))  # [nQB * Bq]
    prefix = F.pad(rows.view(nQB, Bq).sum(1).cumsum(0), (1, 0))  # [nQB + 1]: area before each boundary
    total, cuts = float(prefix[-1]), [0]
    for r in range(1, world):
        lo, hi = cuts[-1] + 1, nQB - (world - r)  # leave a block for this rank and each later one
        gap = (prefix[lo : hi + 1].double() - total * r / world).abs()
        cuts.append(lo + int(torch.argmin(gap)))  # argmin takes the first of ties
    cuts.append(nQB)
    ranges = tuple(((min(a * Bq, T), min(b * Bq, T)),) for a, b in zip(cuts[:-1], cuts[1:]))
    return Sharding("balanced", T, world, ranges)

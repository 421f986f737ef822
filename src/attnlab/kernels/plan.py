"""Planning for the CPU executor: how a block layout becomes a few large kernel calls.

Each query block's visited key blocks split into runs of consecutive blocks. Runs of equal shape
form groups; a group whose runs start at evenly spaced blocks becomes one call over an overlapping
strided view of K/V (no copy). Scattered blocks (stripes, selections) are gathered per query block
instead, since every extra run would cost a merge over the output. Causal staircases (dense causal,
prefix-LM, documents) become one unmasked prefix call plus one causal square, which the kernel runs
with its own causal mode. Plans are cached per layout.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.kernels.layout import BlockLayout

_CHUNK_ELEMS = 1 << 22  # bound on gathered-K and mask elements per kernel call
_MAX_RUNS_PER_BLOCK = 4  # beyond this many runs per query block, gather instead of merging


@dataclass(frozen=True)
class Group:
    """One kernel call of a plan: query blocks of one layout slice that visit equal runs of key blocks."""

    b: int  # slice indices into the layout
    h: int
    items: Tensor  # [m] query block ids, unique
    blocks: Tensor  # [m, L] key blocks each query block visits in this call, ascending
    masked: bool
    step: int | None  # runs of consecutive blocks whose starts advance evenly: one strided view
    # A causal square: consecutive query blocks and the same number of key blocks from blocks[0, 0],
    # lower-triangular (the diagonal masks are exactly causal): one call with the kernel's own
    # causal mode, which skips the upper half. Only for layouts shared by batch and heads.
    square: bool = False

    @property
    def length(self) -> int:
        return self.blocks.shape[1]

    @property
    def starts(self) -> Tensor:
        return self.blocks[:, 0]

    def key_index(self, Bk: int) -> Tensor:
        """Token index of every key in the call, [m, L * Bk]."""
        return (self.blocks.unsqueeze(-1) * Bk + torch.arange(Bk)).flatten(1)  # host: CPU plan

    @property
    def sel(self) -> slice | Tensor:
        """Index of the group's query blocks: a slice (a view, no copy) when they are consecutive."""
        first, m = int(self.items[0]), len(self.items)
        if int(self.items[-1]) - first == m - 1:
            return slice(first, first + m)
        return self.items


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _runs(kvb: Tensor, part: Tensor):
    """Runs of consecutive key blocks per query block: (n, ordinal, start, length, masked) tensors."""
    valid = kvb >= 0
    prev = F.pad(kvb, (1, 0), value=-2)[:, :-1]
    new = valid & (kvb != prev + 1)
    run_of = torch.cumsum(new.flatten(), 0) - 1  # run id of each flat entry (row-major)
    run_of = run_of[valid.flatten()]
    n_runs = int(new.sum())
    length = torch.bincount(run_of, minlength=n_runs)
    masked = torch.bincount(run_of, weights=part.flatten()[valid.flatten()].double(), minlength=n_runs) > 0
    n, v = torch.nonzero(new, as_tuple=True)
    ordinal = (torch.cumsum(new, dim=1) - 1)[n, v]  # which run of its query block this is
    return n, ordinal, kvb[n, v], length, masked


def _step(starts: Tensor) -> int | None:
    """The constant, non-negative start increment of a group, or None (no negative strides)."""
    d = torch.diff(starts)
    if len(d) == 0:
        return 0
    return int(d[0]) if bool((d == d[0]).all()) and int(d[0]) >= 0 else None


def _evenly_spaced(items: Tensor, starts: Tensor, max_period: int = 8, min_segment: int = 4):
    """Split a group so each part's starts advance evenly (one strided view per part).

    With query blocks smaller than key blocks, a window's first key block advances every p-th
    query block, so taking every p-th item makes the starts affine again. Otherwise (grids in tile
    order, where border tiles break the pattern) cut the group into maximal affine segments, and
    gather what is left in segments shorter than ``min_segment``.
    """
    if _step(starts) is not None:
        return [(items, starts)]
    for p in range(2, max_period + 1):
        parts = [(items[r::p], starts[r::p]) for r in range(p)]
        if all(_step(st) is not None for _, st in parts):
            return parts
    st = starts.tolist()
    parts, rest, i, m = [], [], 0, len(st)
    while i < m:
        j = i + 1
        if j < m and st[j] >= st[i]:
            d = st[j] - st[i]
            while j + 1 < m and st[j + 1] - st[j] == d:
                j += 1
            j += 1
        (parts if j - i >= min_segment else rest).append(torch.arange(i, j))  # host: CPU plan
        i = j
    out = [(items[ix], starts[ix]) for ix in parts]
    if rest:
        ix = torch.cat(rest)
        out.append((items[ix], starts[ix]))
    return out


def _plan(layout: BlockLayout, n_slices_rows: int, span_cost: int) -> list[Group]:
    groups = []
    Bl, Hl = layout.kv_blocks.shape[:2]
    for b in range(Bl):
        for h in range(Hl):
            kvb, part = layout.kv_blocks[b, h], layout.partial[b, h]
            # Scattered blocks (stripes, selections): each extra run per query block costs a merge
            # over the whole output, and uneven runs are copied anyway, so gather each query
            # block's blocks into one call instead.
            runs_info = _runs(kvb, part)
            if Bl == Hl == 1 and layout.block_q == layout.block_k:
                squares, runs_info = _staircases(layout, runs_info)
                groups += squares
            if len(runs_info[0]) > _MAX_RUNS_PER_BLOCK * max(int((kvb >= 0).any(1).sum()), 1):
                runs = _row_groups(kvb, part)
            else:
                runs = _run_groups(*runs_info, kvb.shape[-1])
                gathered = sum(len(it) for it, bl, _ in runs if _step(bl[:, 0]) is None)
                if gathered * 2 > len(runs_info[0]):
                    runs = _row_groups(kvb, part)
            for items, blocks, msk in runs:
                per = max(1, _CHUNK_ELEMS // (blocks.shape[1] * layout.block_k * max(n_slices_rows, span_cost)))
                for c in range(0, len(items), per):
                    it, bl = items[c : c + per], blocks[c : c + per]
                    step = _step(bl[:, 0]) if _is_run(bl) else None
                    groups.append(Group(b, h, it, bl, msk, step))
    return groups


def _staircases(layout: BlockLayout, runs_info):
    """Find causal staircases among the runs and return (their groups, the runs left over).

    A staircase is a stretch of consecutive query blocks n, each with a single run [s, n + c] of full
    blocks ending in a partial diagonal block whose mask is exactly causal. It becomes an unmasked
    call over the shared prefix [s, d0) plus one causal square call, instead of one masked call per
    query block.
    """
    n, ordinal, start, length, masked = runs_info
    kvb, part = layout.kv_blocks[0, 0], layout.partial[0, 0]
    B = layout.block_q
    off = layout.S - layout.T
    single = torch.bincount(n, minlength=kvb.shape[0])[n] == 1
    last = start + length - 1
    # Only the last block of the run is partial, and it sits on the causal diagonal.
    n_partial = part.sum(1)[n]
    cand = single & (n_partial == 1) & part[n, length - 1] & (last * B == n * B + off)
    if off % B or not bool(cand.any()):
        return [], runs_info
    idx = cand.nonzero().flatten()
    diag_ok = _diagonal_is_causal(layout, n[idx], last[idx])
    idx = idx[diag_ok]
    groups, used = [], torch.zeros(len(n), dtype=torch.bool)  # host: CPU plan
    i = 0
    items, starts = n[idx].tolist(), start[idx].tolist()
    while i < len(idx):
        j = i + 1
        while j < len(idx) and items[j] == items[j - 1] + 1 and starts[j] == starts[i]:
            j += 1
        if j - i >= 2:
            seg = torch.tensor(items[i:j])  # host: CPU plan
            d0 = int(last[idx[i]])
            if d0 > starts[i]:  # the prefix every row of the stretch sees in full
                blocks = (starts[i] + torch.arange(d0 - starts[i])).expand(len(seg), -1)  # host: CPU plan
                groups.append(Group(0, 0, seg, blocks, False, 0))
            diag = (d0 + torch.arange(len(seg))).unsqueeze(1)  # host: CPU plan
            groups.append(Group(0, 0, seg, diag, False, None, square=True))
            used[idx[i:j]] = True
        i = j
    keep = ~used
    return groups, tuple(x[keep] for x in runs_info)


def _diagonal_is_causal(layout: BlockLayout, items: Tensor, diag: Tensor) -> Tensor:
    """Whether each diagonal block's mask equals j <= i (rows past T don't count). [m] bool."""
    B, T, S = layout.block_q, layout.T, layout.S
    r = torch.arange(B)  # host: CPU plan
    q_idx = items.view(-1, 1, 1) * B + r.view(1, -1, 1)
    kv_idx = diag.view(-1, 1, 1) * B + r.view(1, 1, -1)
    zero = torch.tensor(0)  # host: CPU plan
    allowed = layout.mask_mod(zero, zero, q_idx.clamp(max=T - 1), kv_idx.clamp(max=S - 1)) & (kv_idx < S)
    tril = r.view(-1, 1) >= r.view(1, -1)
    ok = (allowed == tril) | (q_idx >= T)
    return ok.flatten(1).all(1)


def _is_run(blocks: Tensor) -> bool:
    return blocks.shape[1] <= 1 or bool((torch.diff(blocks, dim=1) == 1).all())


def _run_groups(n, ordinal, start, length, masked, max_visits: int) -> list[tuple[Tensor, Tensor, bool]]:
    """Group runs of equal (ordinal, length, masked); split each into evenly spaced parts."""
    V = max_visits + 1
    # A group holds each query block at most once (the ordinal), so its results can be written or
    # merged with one indexed store.
    key = (ordinal * (V + 1) + length) * 2 + masked.long()
    out = []
    for kval in torch.unique(key).tolist():
        sel = key == kval
        L, msk = (kval // 2) % (V + 1), bool(kval % 2)
        for it, st in _evenly_spaced(n[sel], start[sel]):
            out.append((it, st.unsqueeze(1) + torch.arange(L), msk))  # host: CPU plan
    return out


def _row_groups(kvb: Tensor, part: Tensor) -> list[tuple[Tensor, Tensor, bool]]:
    """Group whole query blocks by how many key blocks they visit; each call gathers them all."""
    count = (kvb >= 0).sum(1)
    out = []
    for cnt in torch.unique(count[count > 0]).tolist():
        items = (count == cnt).nonzero().flatten()
        out.append((items, kvb[items, :cnt], bool(part[items, :cnt].any())))
    return out


def get_plan(layout: BlockLayout, rows_cost: int, span_cost: int) -> tuple[list[Group], dict]:
    """The plan for a layout and call geometry, with a cache for its shared masks."""
    key = (rows_cost, span_cost)
    cache = _plans.setdefault(layout, {})
    if key not in cache:
        cache[key] = (_plan(layout, rows_cost, span_cost), {})
    return cache[key]

"""DHSA budget filling (Xiong et al., arXiv 2510.24606; the rule is in dynamic_hierarchical.py's
docstring): every batch row and query row at once, with batched ops on the selection's device.

Row p's rest range [sinks, R), R = p - local + 1, meets exactly the chunks up to e, the chunk holding
key R - 1: each whole (clamped at the sinks) but e, which holds s = R - max(lo_e, sinks) keys. So the
fill depends on the row only through the pair (query chunk u, e), shared by runs of rows (at most
2 Nc + 1 runs per batch row, since u and e only grow along the rows), and two scalars: s and the room
left by the sinks and the local window. Each pair ranks its chunks once; each row then finds how far
down its pair's list the budget reaches with one binary search.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.kernels.layout import interval_blocks


def fill_budgets(lo_c, hi_c, order, rank, chunk_of, p, S: int, o: dict, block, k_max: int, rows_elems: int):
    """Budget filling for every (batch row, query row), exactly.

    lo_c, hi_c [B, Nc]: chunk bounds; order, rank [B, Nc, Nc]: key chunks by rank / ranks, per query
    chunk; chunk_of [B, S]; p [T]: key positions of the rows; k_max: a bound on any row's chosen
    chunks. Returns take, cut [B, T] and the block classification visited, full [B, nQB, nKB]. Rows
    go in block-aligned passes of at most ``rows_elems`` (row, chunk) elements: a handful of passes
    bound the memory, each one batched over every row it holds.
    """
    B, Nc = lo_c.shape
    T, (Bq, Bk), dev = len(p), block, p.device
    take = torch.empty(B, T, dtype=torch.long, device=dev)
    cut = torch.empty(B, T, dtype=torch.long, device=dev)
    visited = torch.zeros(B, math.ceil(T / Bq), math.ceil(S / Bk), dtype=torch.bool, device=dev)
    full = torch.zeros_like(visited)
    step = Bq * max(1, rows_elems // (B * Bq * (Nc + 2)))
    for r0 in range(0, T, step):
        r = slice(r0, min(T, r0 + step))
        qb = slice(r0 // Bq, math.ceil(r.stop / Bq))
        out = _fill_rows(lo_c, hi_c, order, rank, chunk_of, p[r], S, o, block, k_max)
        take[:, r], cut[:, r], visited[:, qb], full[:, qb] = out
    return take, cut, visited, full


def _fill_rows(lo_c, hi_c, order, rank, chunk_of, p, S: int, o: dict, block, k_max: int):
    """fill_budgets for a run of n rows starting at a query-block boundary, every batch row at once.
    Row-level tensors are flat [B * n], batch-major."""
    sinks, local, budget = o["sinks"], o["local"], o["budget"]
    B, Nc = lo_c.shape
    n, dev = len(p), p.device
    b = torch.arange(B, device=dev).repeat_interleave(n)  # [B * n] each row's batch row
    pr = p.repeat(B)  # [B * n]
    size = (hi_c - lo_c.clamp(min=sinks)).clamp(min=0)  # [B, Nc] each chunk's keys in the rest ranges
    R = pr - local + 1  # exclusive end of each row's rest range
    rest = R > sinks
    u = chunk_of[b, pr.clamp(min=0)]  # query chunk
    e = torch.where(rest, chunk_of[b, (R - 1).clamp(0, S - 1)], -1)  # -1: no rest range
    # Pairs are runs of equal (b, u, e); a static bound on their count keeps this free of host syncs.
    key = (b * Nc + u) * (Nc + 1) + e + 1
    pair = F.pad((key[1:] != key[:-1]).long(), (1, 0)).cumsum(0)  # [B * n] run index
    P = B * min(n, 2 * Nc + 1)
    pair_key = torch.zeros(P, dtype=torch.long, device=dev).scatter_(0, pair, key)  # spare runs: b=0, u=0, no e
    pb, pue = pair_key // (Nc * (Nc + 1)), pair_key % (Nc * (Nc + 1))
    L, n_list, pos_e, csum = _pair_lists(order, size, pb, pue // (Nc + 1), pue % (Nc + 1) - 1)
    # A row's running total over its list is csum, less d = size_e - s from e's place on.
    ec = e.clamp(min=0)
    d = torch.where(rest, size[b, ec] - (R - lo_c[b, ec].clamp(min=sinks)), 0)
    n_local = (pr + 1).clamp(0, local)
    n_sink = torch.minimum(pr + 1 - n_local, torch.full_like(pr, sinks)).clamp(min=0)
    room = (budget - n_local - n_sink).clamp(min=0)
    pad = S + budget + 1  # above any total or room: list slots past the end never fit
    band = torch.arange(P, device=dev).unsqueeze(1) * (pad + 1)  # one sorted band per pair
    flat = (torch.where(torch.arange(Nc, device=dev) < n_list.unsqueeze(1), csum, pad) + band).flatten()

    def fits(v: Tensor) -> Tensor:  # list entries whose running total is <= v
        return torch.searchsorted(flat, v + band[pair, 0], right=True) - pair * Nc

    t1, pe = fits(room), pos_e[pair]
    k = torch.where(t1 < pe, t1, fits(room + d))  # chunks taken whole: a prefix of the list
    over = k < n_list[pair]  # the list's chunk k overflows: its most recent keys fill the rest
    star = L[pair, k.clamp(max=Nc - 1)]
    j = (k - 1).clamp(min=0)
    before = torch.where(k > 0, csum[pair, j] - torch.where(j >= pe, d, 0), 0)
    cut = torch.where(over, torch.minimum(hi_c[b, star], R) - (room - before), S)
    take = torch.where(over, rank[b, u, star], Nc)
    visited, full = _classify(lo_c, hi_c, L, pair, b, k, k + over.long(), cut, pr, S, o, block, k_max)
    return take.view(B, n), cut.view(B, n), visited, full


def _pair_lists(order: Tensor, size: Tensor, pb: Tensor, pu: Tensor, pe: Tensor):
    """Per pair (batch row pb, query chunk pu, last rest chunk pe; -1 = none), [P]: the nonempty
    chunks <= pe in rank order L [P, Nc] (first n_list [P] slots), e's slot pos_e [P], and the running
    totals of whole sizes along L, csum [P, Nc]."""
    ranked = order[pb, pu]  # [P, Nc]
    keep = (ranked <= pe.unsqueeze(1)) & (size[pb.unsqueeze(1), ranked] > 0)
    L = ranked.gather(1, torch.argsort((~keep).to(torch.uint8), dim=1, stable=True))  # kept first
    n_list = keep.sum(1)
    pos_e = torch.where(pe >= 0, (L == pe.unsqueeze(1)).int().argmax(1), L.shape[1])
    return L, n_list, pos_e, size[pb.unsqueeze(1), L].cumsum(1)


def _classify(lo_c, hi_c, L, pair, b, k, n_chosen, cut, p, S: int, o: dict, block, K: int):
    """visited, full [B, nQB, nKB] from each row's intervals: sinks, the local window, its first
    n_chosen (<= K) list chunks (the one at slot k from cut on). Rows are flat [B * n], batch-major."""
    sinks, local = o["sinks"], o["local"]
    B, Bq = lo_c.shape[0], block[0]
    slots = torch.arange(K, device=p.device)
    pr, R = p.unsqueeze(1), p.unsqueeze(1) - local + 1
    c = L[pair, :K]  # [B * n, K]
    lo_k, hi_k = lo_c[b.unsqueeze(1), c], hi_c[b.unsqueeze(1), c]
    lo = torch.where(slots == k.unsqueeze(1), torch.maximum(lo_k, cut.unsqueeze(1)), lo_k).clamp(min=sinks)
    hi = torch.where(slots < n_chosen.unsqueeze(1), torch.minimum(hi_k, R), lo)
    lo = torch.cat([lo, torch.zeros_like(pr), R.clamp(min=sinks)], 1).view(B, -1, K + 2)  # + sinks, local window
    hi = torch.cat([hi, (pr + 1).clamp(max=sinks), pr + 1], 1).view(B, -1, K + 2)
    # Batch rows stack along the row axis once each fills whole query blocks: a ragged last block
    # repeats its last row, which changes neither "some row covers a key" nor "every row covers all".
    extra = -lo.shape[1] % Bq
    lo, hi = (torch.cat([x, x[:, -1:].expand(-1, extra, -1)], 1) for x in (lo, hi))
    visited, full = interval_blocks(lo.flatten(0, 1).int(), hi.flatten(0, 1).int(), S, block)  # int32: faster division
    return visited.view(B, -1, visited.shape[-1]), full.view(B, -1, full.shape[-1])

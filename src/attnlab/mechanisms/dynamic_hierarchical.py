"""Dynamic Hierarchical Sparse Attention, DHSA (Xiong et al., arXiv 2510.24606).

Keys are cut into variable-length chunks; chunk similarity decides, per query, which keys beyond its
local window it attends to. Query row i sits at key position p = i + S - T and belongs to the chunk u
holding p (the paper's default: dynamic chunks on both sides).

Chunking (``chunking=``):
  * ``"boundary"`` — the spec's attention-mass rule (§3.1 1b): with A the head-averaged causal
    softmax map and window w, candidate c scores (max(P, F) + eps) / (min(P, F) + eps) where
    P = Σ_{r > c+w} Σ_{j ∈ [c-w+1, c]} A[r, j] and F the same over j ∈ [c+1, c+w]; candidates over
    ``threshold`` are kept by score with 1-D NMS (``nms_window``), at most ``max_chunks - 1``, and a
    boundary falls after each. A is never materialized: column masses come from a second fused
    causal forward pass over the reversed sequence (``_column_mass``), the near-diagonal band
    directly. This is O(T²) work: the paper trains a small predictor to replace it at inference.
  * ``"fixed"`` — chunks of ``chunk_size`` keys (the cheap option).

Selection (per query token, chunks shared by all heads): chunk scores
S[u, c] = q̄_u · k̄_c with k̄_c = sqrt(|c|) · mean of the chunk's keys over tokens and heads (q̄ the
same over the query chunk and query heads), no 1/sqrt(d). Query i keeps its ``local`` most recent
visible keys and the first ``sinks`` keys, then fills the rest of its ``budget`` with whole chunks
in order of S[u, ·] (ties to the more recent chunk), the last one partially, most recent tokens
first. Sinks and the local window count against the budget. A budget >= p + 1 is dense causal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import AttentionOutput, nonnegative_int, positive_int, repeat_kv, resolve_scale
from attnlab.kernels import BlockLayout, block_sizes, block_sparse_attention
from attnlab.kernels.layout import interval_blocks, layout_from_blocks

DEFAULTS = {
    "chunking": "boundary",
    "chunk_size": 64,
    "budget": 1024,
    "local": 128,
    "sinks": 128,
    "boundary_window": 4,
    "threshold": 1.1,
    "nms_window": 8,
    "max_chunks": None,
}
_ROWS_ELEMS = 1 << 22  # (row, chunk) pairs held at once while filling budgets
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class ChunkSelection(NamedTuple):
    """chunk_of [B, S] key chunk ids; rank [B, Nc, Nc] (rank[b, u, c] of key chunk c for query
    chunk u); take / cut [B, T]: query i takes chunks ranked < take[i] whole and, from the chunk
    ranked take[i], its visible tokens >= cut[i]; and the executor layout."""

    chunk_of: Tensor
    rank: Tensor
    take: Tensor
    cut: Tensor
    layout: BlockLayout
    local: int
    sinks: int

    def dense_mask(self) -> Tensor:
        """The equivalent token mask [B, 1, T, S]."""
        lay = self.layout
        i = torch.arange(lay.T).view(1, -1, 1)
        j = torch.arange(lay.S).view(1, 1, -1)
        b = torch.arange(self.chunk_of.shape[0]).view(-1, 1, 1)
        return _allowed(self, b, i, j, lay.S - lay.T).unsqueeze(1)


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    if not causal:
        raise ValueError("dynamic_hierarchical is causal (a decoder's prefill); call it with causal=True")
    if opts["chunking"] not in ("boundary", "fixed"):
        raise ValueError(f"chunking must be 'boundary' or 'fixed', got {opts['chunking']!r}")
    out = dict(opts)
    for name in ("chunk_size", "budget", "boundary_window", "nms_window"):
        out[name] = positive_int(name, opts[name])
    for name in ("local", "sinks"):
        out[name] = nonnegative_int(name, opts[name])
    th = opts["threshold"]
    if isinstance(th, bool) or not isinstance(th, (int, float)) or th < 1:
        raise ValueError(f"threshold must be a number >= 1 (a mass ratio), got {th!r}")
    if opts["max_chunks"] is not None:
        out["max_chunks"] = positive_int("max_chunks", opts["max_chunks"])
    return out


def _column_mass(q: Tensor, k: Tensor, scale: float, w: int):
    """Head-averaged causal attention: column sums [B, S] and the band A[j + d, j], d < 2w: [B, S, 2w].
    Self-attention layout (T == S) in the compute dtype.

    Two fused forward passes and no T x S tensor. The first gives each row's log-normalizer lse_r.
    Column j's mass, sum_{r >= j} exp(s q_r.k_j - lse_r), is then itself a softmax normalizer: in a
    causal pass over the reversed sequence where k_j asks and q_r answers, with -lse_r / s riding
    along as an extra key coordinate against a constant 1 on the query side, the kernel's own
    log-sum-exp for row j is log(mass_j). (A backward pass with dO = 1 gives the same, dV = P^T 1,
    at about twice the cost of a forward.)
    """
    B, H, S, D = q.shape
    kk = repeat_kv(k, H // k.shape[1]).contiguous()
    _, lse = _flash(q, kk, kk, 0.0, True, scale=scale)  # [B, H, S]
    asks = torch.cat([kk, torch.ones_like(kk[..., :1])], -1).flip(2)  # [B, H, S, D + 1], reversed
    answers = torch.cat([q, (-lse / scale).unsqueeze(-1).to(q.dtype)], -1).flip(2)
    _, lse_cols = _flash(asks, answers, answers, 0.0, True, scale=scale)
    cols = lse_cols.flip(2).exp().mean(1)  # [B, S]
    band = []
    for d in range(2 * w):
        r = torch.arange(min(d, S), S)  # none when the band runs past a short sequence
        s = (q[:, :, r] * kk[:, :, r - d]).sum(-1) * scale - lse[:, :, r]
        band.append(F.pad(torch.exp(s).mean(1), (0, S - len(r))))  # A[j + d, j] at index j
    return cols, torch.stack(band, -1)


def _boundaries(q: Tensor, k: Tensor, scale: float, o: dict) -> list[Tensor]:
    """Chunk starts per batch row (each begins with 0)."""
    B, S = k.shape[0], k.shape[2]
    if o["chunking"] == "fixed":
        return [torch.arange(0, S, o["chunk_size"])] * B
    w = o["boundary_window"]
    cols, band = _column_mass(q, k, scale, w)
    max_chunks = o["max_chunks"] or max(1, S // o["chunk_size"])
    out = []
    for b in range(B):
        c = torch.arange(w - 1, max(w - 1, S - w - 1))  # candidates with a full window and rows after c + w
        if len(c) == 0:
            out.append(torch.tensor([0]))
            continue
        j = c.view(-1, 1) + torch.arange(-w + 1, w + 1).view(1, -1)  # [n, 2w] columns around c
        upto = c.view(-1, 1) + w - j  # rows j .. c + w are excluded: band offsets 0 .. upto
        d = torch.arange(2 * w).view(1, 1, -1)
        near = (band[b][j] * (d <= upto.unsqueeze(-1))).sum(-1)
        mass = cols[b][j] - near  # Σ_{r > c + w} A[r, j]
        past, fut = mass[:, :w].sum(1), mass[:, w:].sum(1)
        eps = 1e-6
        ratio = (torch.maximum(past, fut) + eps) / (torch.minimum(past, fut) + eps)
        keep = []
        for idx in torch.argsort(ratio, descending=True, stable=True).tolist():
            if ratio[idx] <= o["threshold"] or len(keep) >= max_chunks - 1:
                break
            if all(abs(idx - k_) >= o["nms_window"] for k_ in keep):
                keep.append(idx)
        starts = sorted({0, *(int(c[i]) + 1 for i in keep)})
        out.append(torch.tensor(starts))
    return out


def _allowed(sel: ChunkSelection, b: Tensor, q_idx: Tensor, kv_idx: Tensor, off: int) -> Tensor:
    p = q_idx + off
    pc = p.clamp(min=0)
    u = sel.chunk_of[b, pc]
    c = sel.chunk_of[b, kv_idx]
    rank = sel.rank[b, u, c]
    take, cut = sel.take[b, q_idx], sel.cut[b, q_idx]  # per query row
    rest = (kv_idx >= sel.sinks) & (kv_idx <= p - sel.local)
    chosen = (rank < take) | ((rank == take) & (kv_idx >= cut))
    return (kv_idx <= p) & (p >= 0) & ((kv_idx > p - sel.local) | (kv_idx < sel.sinks) | (rest & chosen))


@torch.no_grad()
def select(q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None, **opts) -> ChunkSelection:
    o = {**DEFAULTS, **opts}
    B, H, T, D = q.shape
    S = k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(ct), k.to(ct)
    off = S - T
    if o["chunking"] == "boundary" and T != S:
        raise ValueError("chunking='boundary' needs self-attention (T == S); use chunking='fixed' for KV caches")
    starts = _boundaries(qf, kf, resolve_scale(scale, D), o)
    Nc = max(len(s) for s in starts)
    chunk_of = torch.stack([torch.bucketize(torch.arange(S), s, right=True) - 1 for s in starts])  # [B, S]
    counts = torch.stack([torch.bincount(co, minlength=Nc) for co in chunk_of])  # [B, Nc]
    k_mean = kf.mean(1)  # [B, S, D] over kv heads
    k_bar = torch.stack([torch.zeros(Nc, D, dtype=ct).index_add_(0, chunk_of[b], k_mean[b]) for b in range(B)])
    norm = counts.clamp(min=1).to(ct)
    k_bar = k_bar / norm.unsqueeze(-1) * norm.sqrt().unsqueeze(-1)  # sqrt(|c|) * mean
    # query chunks: the key chunks of the query positions
    p = torch.arange(T) + off
    q_chunk = chunk_of[:, p.clamp(min=0)]  # [B, T]
    q_mean = qf.mean(1)  # [B, T, D]
    q_sum = torch.stack([torch.zeros(Nc, D, dtype=ct).index_add_(0, q_chunk[b], q_mean[b]) for b in range(B)])
    q_cnt = torch.stack([torch.bincount(q_chunk[b], minlength=Nc) for b in range(B)]).clamp(min=1).to(ct)
    q_bar = q_sum / q_cnt.unsqueeze(-1) * q_cnt.sqrt().unsqueeze(-1)
    score = q_bar @ k_bar.transpose(1, 2)  # [B, Nc(query), Nc(key)]
    # rank key chunks per query chunk: score desc, ties to the more recent chunk
    order = Nc - 1 - torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(Nc).expand_as(order))

    lo_c = torch.stack(_pad_starts(starts, Nc, S))  # [B, Nc] chunk starts
    hi_c = torch.cat([lo_c[:, 1:], torch.full((B, 1), S)], 1)  # exclusive ends
    block = block_sizes()
    filled = [_fill_budgets(lo_c[b], hi_c[b], order[b], rank[b], chunk_of[b], p, S, o, block) for b in range(B)]
    take, cut, visited, full = (torch.stack(x) for x in zip(*filled))
    visited, full = visited.unsqueeze(1), full.unsqueeze(1)  # [B, 1, nQB, nKB]: shared by heads
    sel = ChunkSelection(chunk_of, rank, take, cut, None, o["local"], o["sinks"])

    def dhsa(bb, h, q_idx, kv_idx):
        return _allowed(sel, bb, q_idx, kv_idx, off)

    return sel._replace(layout=layout_from_blocks(visited, full, T, S, block, dhsa, selected=True))


def _fill_budgets(lo_c, hi_c, order, rank, chunk_of, p, S: int, o: dict, block: tuple[int, int]):
    """Budget filling for every query row of one batch row, exactly, in O(T + P * Nc) work.

    lo_c, hi_c [Nc]: chunk bounds; order, rank [Nc, Nc]: key chunks by rank / ranks, per query chunk;
    chunk_of [S]; p [T]: key positions of the rows. Returns take, cut [T] and the block
    classification visited, full [nQB, nKB]. Rows go in block-aligned passes: a pass of n rows
    meets at most n pairs, so it holds O(n * Nc) elements.
    """
    T, (Bq, Bk), Nc = len(p), block, lo_c.shape[0]
    take, cut = torch.empty(T, dtype=torch.long), torch.empty(T, dtype=torch.long)
    visited = torch.zeros(math.ceil(T / Bq), math.ceil(S / Bk), dtype=torch.bool)
    full = torch.zeros_like(visited)
    step = Bq * max(1, _ROWS_ELEMS // (Bq * (Nc + 2)))
    for r0 in range(0, T, step):
        r = slice(r0, min(T, r0 + step))
        qb = slice(r0 // Bq, math.ceil(r.stop / Bq))
        take[r], cut[r], visited[qb], full[qb] = _fill_rows(lo_c, hi_c, order, rank, chunk_of, p[r], S, o, block)
    return take, cut, visited, full


def _fill_rows(lo_c, hi_c, order, rank, chunk_of, p, S: int, o: dict, block: tuple[int, int]):
    """_fill_budgets for a run of rows starting at a query-block boundary.

    Row p's rest range [sinks, R), R = p - local + 1, meets exactly the chunks up to e, the chunk
    holding key R - 1: each whole (clamped at the sinks) but e, which holds s = R - max(lo_e, sinks)
    keys. So the fill depends on the row only through the pair (query chunk u, e), shared by runs of
    rows (P <= 2 Nc + 1 pairs in all), and two scalars: s and the room left by the sinks and local
    window.
    """
    sinks, local, budget = o["sinks"], o["local"], o["budget"]
    Nc = lo_c.shape[0]
    size = (hi_c - lo_c.clamp(min=sinks)).clamp(min=0)  # [Nc] each chunk's keys in the rest ranges
    R = p - local + 1  # [T] exclusive end of each row's rest range
    rest = R > sinks
    u = chunk_of[p.clamp(min=0)]  # [T] query chunk
    e = torch.where(rest, chunk_of[(R - 1).clamp(0, S - 1)], -1)  # [T]; -1: no rest range
    pair_key, pair = torch.unique_consecutive(u * (Nc + 1) + e + 1, return_inverse=True)  # rows come in runs
    L, n_list, pos_e, csum = _pair_lists(order, size, pair_key // (Nc + 1), pair_key % (Nc + 1) - 1)
    # A row's running total over its list is csum, less d = size_e - s from e's place on.
    ec = e.clamp(min=0)
    d = torch.where(rest, size[ec] - (R - lo_c[ec].clamp(min=sinks)), 0)  # [T]
    n_local = (p + 1).clamp(0, local)
    n_sink = torch.minimum(p + 1 - n_local, torch.full_like(p, sinks)).clamp(min=0)
    room = (budget - n_local - n_sink).clamp(min=0)  # [T]
    pad = S + budget + 1  # above any total or room: list slots past the end never fit
    band = torch.arange(len(pair_key)).unsqueeze(1) * (pad + 1)  # one sorted band per pair
    flat = (torch.where(torch.arange(Nc) < n_list.unsqueeze(1), csum, pad) + band).flatten()

    def fits(v: Tensor) -> Tensor:  # [T] list entries whose running total is <= v
        return torch.searchsorted(flat, v + band[pair, 0], right=True) - pair * Nc

    t1, pe = fits(room), pos_e[pair]
    k = torch.where(t1 < pe, t1, fits(room + d))  # chunks taken whole: a prefix of the list
    over = k < n_list[pair]  # the list's chunk k overflows: its most recent keys fill the rest
    star = L[pair, k.clamp(max=Nc - 1)]
    j = (k - 1).clamp(min=0)
    before = torch.where(k > 0, csum[pair, j] - torch.where(j >= pe, d, 0), 0)
    cut = torch.where(over, torch.minimum(hi_c[star], R) - (room - before), S)
    take = torch.where(over, rank[u, star], Nc)
    visited, full = _classify(lo_c, hi_c, L, pair, k, k + over.long(), cut, p, S, o, block)
    return take, cut, visited, full


def _pair_lists(order: Tensor, size: Tensor, pu: Tensor, pe: Tensor):
    """Per pair (query chunk pu, last rest chunk pe; -1 = none), [P]: the nonempty chunks <= pe in
    rank order L [P, Nc] (first n_list [P] slots), e's slot pos_e [P], and the running totals of
    whole sizes along L, csum [P, Nc]."""
    ranked = order[pu]  # [P, Nc]
    keep = (ranked <= pe.unsqueeze(1)) & (size[ranked] > 0)
    L = ranked.gather(1, torch.argsort((~keep).to(torch.uint8), dim=1, stable=True))  # kept first
    n_list = keep.sum(1)
    pos_e = torch.where(pe >= 0, (L == pe.unsqueeze(1)).int().argmax(1), L.shape[1])
    return L, n_list, pos_e, size[L].cumsum(1)


def _classify(lo_c, hi_c, L, pair, k, n_chosen, cut, p, S: int, o: dict, block: tuple[int, int]):
    """visited, full [ceil(n / Bq), nKB] from each row's intervals: sinks, the local window, its
    first n_chosen list chunks (the one at slot k from cut on)."""
    sinks, local = o["sinks"], o["local"]
    K = int(n_chosen.max()) if len(p) else 0
    slots = torch.arange(K)
    pr, R = p.unsqueeze(1), p.unsqueeze(1) - local + 1
    c = L[pair, :K]  # [n, K]
    lo = torch.where(slots == k.unsqueeze(1), torch.maximum(lo_c[c], cut.unsqueeze(1)), lo_c[c]).clamp(min=sinks)
    hi = torch.where(slots < n_chosen.unsqueeze(1), torch.minimum(hi_c[c], R), lo)
    lo = torch.cat([lo, torch.zeros_like(pr), R.clamp(min=sinks)], 1)  # + sinks, local window
    hi = torch.cat([hi, (pr + 1).clamp(max=sinks), pr + 1], 1)
    return interval_blocks(lo.int(), hi.int(), S, block)  # int32: half the traffic, faster division


def _pad_starts(starts: list[Tensor], Nc: int, S: int) -> list[Tensor]:
    """Chunk starts padded to Nc with S (empty chunks) so batch rows stack."""
    return [torch.cat([s, torch.full((Nc - len(s),), S)]) for s in starts]


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, **opts
) -> AttentionOutput:
    sel = select(q, k, causal=causal, scale=scale, **opts)
    return block_sparse_attention(q, k, v, sel.layout, scale=scale)

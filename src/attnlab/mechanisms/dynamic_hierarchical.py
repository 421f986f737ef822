"""Dynamic Hierarchical Sparse Attention, DHSA (Xiong et al., arXiv 2510.24606).

Keys are cut into variable-length chunks; chunk similarity decides, per query, which keys beyond its
local window it attends to. Query row i sits at key position p = i + S - T and belongs to the chunk u
holding p (the paper's default: dynamic chunks on both sides).

Chunking (``chunking=``):
  * ``"boundary"`` — the spec's attention-mass rule (§3.1 1b): with A the head-averaged causal
    softmax map and window w, candidate c scores (max(P, F) + eps) / (min(P, F) + eps) where
    P = Σ_{r > c+w} Σ_{j ∈ [c-w+1, c]} A[r, j] and F the same over j ∈ [c+1, c+w]; candidates over
    ``threshold`` are kept by score with 1-D NMS (``nms_window``), at most ``max_chunks - 1``, and a
    boundary falls after each. A is never materialized: column masses come from one fused causal
    backward pass with an all-ones output gradient (dV = Pᵀ·1), the near-diagonal band directly.
    This is O(T²) work: the paper trains a small predictor to replace it at inference.
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
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


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
    Self-attention layout (T == S) in the compute dtype."""
    B, H, S, D = q.shape
    kk = repeat_kv(k, H // k.shape[1]).contiguous()
    out, lse = _flash(q, kk, kk, 0.0, True, scale=scale)
    _, _, dv = _flash_bwd(torch.ones_like(out), q, kk, kk, out, lse, 0.0, True, scale=scale)
    cols = dv[..., 0].mean(1)  # dV = P^T 1: every column of dV is the column mass
    band = []
    for d in range(2 * w):
        r = torch.arange(d, S)
        s = (q[:, :, r] * kk[:, :, r - d]).sum(-1) * scale - lse[:, :, r]
        band.append(F.pad(torch.exp(s).mean(1), (0, d)))  # A[j + d, j] at index j
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
        c = torch.arange(w - 1, S - w - 1)  # candidates with a full window and rows after c + w
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
    Bq, Bk = block_sizes()
    take, cut = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long)
    visited = torch.zeros(B, 1, math.ceil(T / Bq), math.ceil(S / Bk), dtype=torch.bool)
    full = torch.zeros_like(visited)
    lo_c, hi_c, p32, order32 = lo_c.int(), hi_c.int(), p.int(), order.int()  # int32 halves the traffic
    step = Bq * max(1, _ROWS_ELEMS // (Bq * (Nc + 2)))  # rows per pass: bounded memory, block-aligned
    for b in range(B):
        for r0 in range(0, T, step):
            r1 = min(T, r0 + step)
            rows = slice(r0, r1)
            ranked = order32[b][q_chunk[b, rows]]
            tk, cu, lo, hi = _row_intervals(lo_c[b], hi_c[b], ranked, p32[rows], S, o)
            take[b, rows], cut[b, rows] = tk, cu
            qb = slice(r0 // Bq, math.ceil(r1 / Bq))
            visited[b, 0, qb], full[b, 0, qb] = interval_blocks(lo, hi, S, (Bq, Bk))
    sel = ChunkSelection(chunk_of, rank, take, cut, None, o["local"], o["sinks"])

    def dhsa(bb, h, q_idx, kv_idx):
        return _allowed(sel, bb, q_idx, kv_idx, off)

    return sel._replace(layout=layout_from_blocks(visited, full, T, S, (Bq, Bk), dhsa))


def _row_intervals(lo_c: Tensor, hi_c: Tensor, order: Tensor, p: Tensor, S: int, o: dict):
    """Budget filling for a run of query rows, as disjoint key intervals.

    lo_c, hi_c [Nc]: chunk bounds; order [n, Nc]: key chunks by rank for each row's query chunk;
    p [n]: key positions of the rows. Returns take, cut [n] and intervals lo, hi [n, Nc + 2]:
    sinks, the local window, and each ranked chunk's share of the "rest" range [sinks, p - local].
    """
    sinks, local = o["sinks"], o["local"]
    rest_hi = (p - local + 1).unsqueeze(1)  # exclusive end of the rest range
    lo = lo_c[order].clamp(min=sinks)  # [n, Nc], rank order
    hi = torch.minimum(hi_c[order], rest_hi)
    n_rest = (hi - lo).clamp(min=0)
    n_local = (p + 1).clamp(min=0, max=local)
    n_sink = torch.minimum(p + 1 - n_local, torch.full_like(p, sinks)).clamp(min=0)
    room = (o["budget"] - n_local - n_sink).clamp(min=0)  # [n]
    before = torch.cumsum(n_rest, -1, dtype=n_rest.dtype) - n_rest  # tokens taken by better-ranked chunks
    take = (before + n_rest <= room.unsqueeze(1)).sum(-1)  # chunks ranked < take go whole (a prefix)
    at = take.clamp(max=order.shape[1] - 1).unsqueeze(1)
    partial = (room - before.gather(1, at).squeeze(1)).clamp(min=0)
    cut = torch.where(take < order.shape[1], hi.gather(1, at).squeeze(1) - partial, S)  # most recent tokens
    r = torch.arange(order.shape[1])
    lo = torch.where(r == take.unsqueeze(1), torch.maximum(lo, cut.unsqueeze(1)), lo)
    hi = torch.where(r <= take.unsqueeze(1), hi, lo)  # ranks past take: empty
    sink_iv = (torch.zeros_like(p), torch.minimum(p + 1, torch.full_like(p, sinks)))
    local_iv = ((p - local + 1).clamp(min=sinks), p + 1)
    lo = torch.cat([lo, sink_iv[0].unsqueeze(1), local_iv[0].unsqueeze(1)], 1)
    hi = torch.cat([hi, sink_iv[1].unsqueeze(1), local_iv[1].unsqueeze(1)], 1)
    return take, cut, lo, hi


def _pad_starts(starts: list[Tensor], Nc: int, S: int) -> list[Tensor]:
    """Chunk starts padded to Nc with S (empty chunks) so batch rows stack."""
    return [torch.cat([s, torch.full((Nc - len(s),), S)]) for s in starts]


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, **opts
) -> AttentionOutput:
    sel = select(q, k, causal=causal, scale=scale, **opts)
    return block_sparse_attention(q, k, v, sel.layout, scale=scale)

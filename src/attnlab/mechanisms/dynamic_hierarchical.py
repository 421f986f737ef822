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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import AttentionOutput, nonnegative_int, positive_int, repeat_kv, resolve_scale
from attnlab.kernels import BlockLayout, block_sizes, block_sparse_attention
from attnlab.kernels.layout import layout_from_blocks
from attnlab.mechanisms.dhsa_fill import fill_budgets
from attnlab.spec import Impl, Kind, Mechanism, Workloads

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
_LSE_ELEMS = 1 << 24  # scores held at once by the chunked causal LSE
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
        lay, dev = self.layout, self.chunk_of.device
        i = torch.arange(lay.T, device=dev).view(1, -1, 1)
        j = torch.arange(lay.S, device=dev).view(1, 1, -1)
        b = torch.arange(self.chunk_of.shape[0], device=dev).view(-1, 1, 1)
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


def _causal_lse(q: Tensor, k: Tensor, scale: float, fused: bool | None = None) -> Tensor:
    """Row log-normalizers [B, H, T] of causal self-attention. CPU: the fused flash kernel. Other
    devices (or ``fused=False``): row chunks of at most _LSE_ELEMS scores (no T x S tensor, any dtype)."""
    if q.device.type == "cpu" if fused is None else fused:
        return _flash(q, k, k, 0.0, True, scale=scale)[1]
    B, H, T, _ = q.shape
    step = max(1, _LSE_ELEMS // max(1, B * H * T))
    out = []
    for r0 in range(0, T, step):  # a handful of row chunks bound the memory
        r1 = min(T, r0 + step)
        s = q[:, :, r0:r1] @ k[:, :, :r1].transpose(-1, -2) * scale  # [B, H, m, r1]
        rows = torch.arange(r0, r1, device=q.device).view(-1, 1)
        s = s.masked_fill(rows < torch.arange(r1, device=q.device), float("-inf"))
        out.append(torch.logsumexp(s, -1))
    return torch.cat(out, 2)


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
    lse = _causal_lse(q, kk, scale)  # [B, H, S]
    asks = torch.cat([kk, torch.ones_like(kk[..., :1])], -1).flip(2)  # [B, H, S, D + 1], reversed
    answers = torch.cat([q, (-lse / scale).unsqueeze(-1).to(q.dtype)], -1).flip(2)
    cols = _causal_lse(asks, answers, scale).flip(2).exp().mean(1)  # [B, S]
    band = []
    for d in range(2 * w):  # 2w band offsets
        r = torch.arange(min(d, S), S, device=q.device)  # none when the band runs past a short sequence
        s = (q[:, :, r] * kk[:, :, r - d]).sum(-1) * scale - lse[:, :, r]
        band.append(F.pad(torch.exp(s).mean(1), (0, S - len(r))))  # A[j + d, j] at index j
    return cols, torch.stack(band, -1)


def _boundary_ratio(q: Tensor, k: Tensor, scale: float, w: int) -> Tensor:
    """The spec's mass ratio [B, n] of candidates c = w - 1 + index (a full window and rows after
    c + w), every batch row at once."""
    S = k.shape[2]
    cols, band = _column_mass(q, k, scale, w)
    c = torch.arange(w - 1, max(w - 1, S - w - 1), device=q.device)  # [n]
    j = c.view(-1, 1) + torch.arange(-w + 1, w + 1, device=q.device).view(1, -1)  # [n, 2w] columns around c
    upto = c.view(-1, 1) + w - j  # rows j .. c + w are excluded: band offsets 0 .. upto
    d = torch.arange(2 * w, device=q.device).view(1, 1, -1)
    near = (band[:, j] * (d <= upto.unsqueeze(-1))).sum(-1)  # [B, n, 2w]
    mass = cols[:, j] - near  # Σ_{r > c + w} A[r, j]
    past, fut = mass[..., :w].sum(-1), mass[..., w:].sum(-1)
    eps = 1e-6
    return (torch.maximum(past, fut) + eps) / (torch.minimum(past, fut) + eps)


def _nms(ratio: Tensor, threshold: float, window: int, cap: int) -> Tensor:
    """Greedy 1-D non-maximum suppression, every batch row at once: walk each row's candidates by
    ratio (descending, stable), keep one over ``threshold`` unless a kept one lies closer than
    ``window``, at most ``cap``. Returns keep bool [B, n] on the host.

    The walk is sequential in rank order by definition, so it runs on the host after one transfer
    (a host sync); each step decides the next candidate of every batch row with a few tensor ops."""
    r = ratio.cpu()  # host sync
    B, n = r.shape
    order = torch.argsort(r, dim=1, descending=True, stable=True)  # [B, n]
    over = r.gather(1, order) > threshold  # a prefix of each row: ratios only fall
    keep = torch.zeros(B, n, dtype=torch.bool)  # host: the greedy walk runs on the host
    blocked = torch.zeros(B, n + 2 * window, dtype=torch.bool)  # host: padded by window on both sides
    count = torch.zeros(B, dtype=torch.long)  # host: the greedy walk runs on the host
    # x blocks x - window + 1 .. x + window - 1
    rows, near = torch.arange(B), torch.arange(1, 2 * window)  # host: the greedy walk runs on the host
    for i in range(n):  # rank positions, all rows at once
        live = over[:, i] & (count < cap)
        if not live.any():
            break  # counts only grow: no row keeps anything more
        x = order[:, i]
        ok = live & ~blocked[rows, x + window]
        keep[rows, x] |= ok
        count += ok
        blocked[rows.unsqueeze(1), x.unsqueeze(1) + near] |= ok.unsqueeze(1)
    return keep


def _boundaries(q: Tensor, k: Tensor, scale: float, o: dict) -> Tensor:
    """Chunk starts [B, Nc] (each row begins with 0; rows with fewer chunks are padded with S)."""
    B, S, dev = k.shape[0], k.shape[2], k.device
    if o["chunking"] == "fixed":
        return torch.arange(0, S, o["chunk_size"], device=dev).expand(B, -1).contiguous()
    w = o["boundary_window"]
    max_chunks = o["max_chunks"] or max(1, S // o["chunk_size"])
    if S - w - 1 <= w - 1:  # no candidate
        return torch.zeros(B, 1, dtype=torch.long, device=dev)
    keep = _nms(_boundary_ratio(q, k, scale, w), o["threshold"], o["nms_window"], max_chunks - 1)
    Nc = int(keep.sum(1).max()) + 1  # a host value already: the chunk count is a shape
    at = torch.zeros(B, S, dtype=torch.bool)  # host: built from the host-side NMS, moved once below
    at[:, 0] = True
    at[:, w : w + keep.shape[1]] = keep  # a boundary after candidate c = w - 1 + index: start c + 1
    starts = torch.where(at, torch.arange(S), S).sort(dim=1).values[:, :Nc].contiguous()  # host: as `at`
    return starts.to(dev)


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


def _chunk_sums(x: Tensor, chunk: Tensor, Nc: int) -> tuple[Tensor, Tensor]:
    """Per-chunk sums [B, Nc, D] and counts [B, Nc] of x [B, L, D] under chunk ids [B, L], all rows
    in one index_add (rows go to disjoint slots, so each slot sums in the same order as alone)."""
    B, L, D = x.shape
    flat = (chunk + torch.arange(B, device=x.device).view(-1, 1) * Nc).flatten()
    sums = torch.zeros(B * Nc, D, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(B * L, D))
    ones = torch.ones(B * L, dtype=torch.long, device=x.device)
    counts = torch.zeros(B * Nc, dtype=torch.long, device=x.device).index_add_(0, flat, ones)
    return sums.view(B, Nc, D), counts.view(B, Nc)


def _decide(q: Tensor, k: Tensor, scale: float | None, o: dict):
    """The selection up to its block decisions: (ChunkSelection without layout, visited, full
    [B, 1, nQB, nKB]). On q's device; with fixed chunking it has no host sync (a test runs it on meta)."""
    B, H, T, D = q.shape
    S, dev = k.shape[2], q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(ct), k.to(ct)
    lo_c = _boundaries(qf, kf, resolve_scale(scale, D), o)  # [B, Nc] chunk starts
    Nc = lo_c.shape[1]
    chunk_of = torch.searchsorted(lo_c, torch.arange(S, device=dev).expand(B, S).contiguous(), right=True) - 1
    k_sum, counts = _chunk_sums(kf.mean(1), chunk_of, Nc)  # over kv heads, then tokens
    norm = counts.clamp(min=1).to(ct)
    k_bar = k_sum / norm.unsqueeze(-1) * norm.sqrt().unsqueeze(-1)  # sqrt(|c|) * mean
    # query chunks: the key chunks of the query positions
    p = torch.arange(T, device=dev) + S - T
    q_chunk = chunk_of[:, p.clamp(min=0)]  # [B, T]
    q_sum, q_cnt = _chunk_sums(qf.mean(1), q_chunk, Nc)
    q_cnt = q_cnt.clamp(min=1).to(ct)
    q_bar = q_sum / q_cnt.unsqueeze(-1) * q_cnt.sqrt().unsqueeze(-1)
    score = q_bar @ k_bar.transpose(1, 2)  # [B, Nc(query), Nc(key)]
    # rank key chunks per query chunk: score desc, ties to the more recent chunk
    order = Nc - 1 - torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(Nc, device=dev).expand_as(order))
    hi_c = torch.cat([lo_c[:, 1:], torch.full((B, 1), S, device=dev)], 1)  # exclusive ends
    # A row with a rest range has room = budget - local - sinks. Chunks are at least min_size long
    # (boundaries keep nms_window apart and w from the ends), so it takes at most room // min_size
    # of them whole, plus the ones cut short by the sinks and by its window, plus the one it takes in
    # part: a static bound on its chosen chunks (no host read of the actual maximum).
    min_size = o["chunk_size"] if o["chunking"] == "fixed" else min(o["nms_window"], o["boundary_window"])
    k_max = min(Nc, max(0, o["budget"] - o["local"] - o["sinks"]) // min_size + 3)
    filled = fill_budgets(lo_c, hi_c, order, rank, chunk_of, p, S, o, block_sizes(), k_max, _ROWS_ELEMS)
    take, cut, visited, full = filled
    sel = ChunkSelection(chunk_of, rank, take, cut, None, o["local"], o["sinks"])
    return sel, visited.unsqueeze(1), full.unsqueeze(1)  # shared by heads


@torch.no_grad()
def select(q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None, **opts) -> ChunkSelection:
    """Chunk, score and fill every row's budget with batched ops on q's device. Host syncs: the
    layout's width (a shape), and with boundary chunking the NMS walk and the chunk count."""
    o = {**DEFAULTS, **opts}
    T, S = q.shape[2], k.shape[2]
    if o["chunking"] == "boundary" and T != S:
        raise ValueError("chunking='boundary' needs self-attention (T == S); use chunking='fixed' for KV caches")
    sel, visited, full = _decide(q, k, scale, o)
    off = S - T

    def dhsa(bb, h, q_idx, kv_idx):
        return _allowed(sel, bb, q_idx, kv_idx, off)

    return sel._replace(layout=layout_from_blocks(visited, full, T, S, block_sizes(), dhsa, selected=True))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    selection: ChunkSelection | None = None,
    **opts,
) -> AttentionOutput:
    sel = select(q, k, causal=causal, scale=scale, **opts) if selection is None else selection
    return block_sparse_attention(q, k, v, sel.layout, scale=scale)


SPEC = Mechanism(
    "dynamic_hierarchical",
    "DHSA, arXiv 2510.24606",
    Kind.SELECTION,
    {"blocksparse": Impl(attention)},
    check_options,
    DEFAULTS,
    patterns=frozenset({"self_causal", "cross_causal"}),
    example=lambda S: {"chunking": "fixed", "chunk_size": 4, "budget": 9, "local": 2, "sinks": 1},
    workloads=Workloads(
        efficiency=lambda T: {"chunking": "fixed"},  # the boundary rule is a labelling pass (O(T^2)): time inference
        quality=lambda L: {
            "chunking": "fixed",
            "chunk_size": max(1, L // 16),
            "budget": L // 4,
            "local": L // 8,
            "sinks": 4,
        },
    ),
    select=select,
    selection_type=ChunkSelection,
)

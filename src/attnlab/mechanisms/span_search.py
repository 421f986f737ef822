"""Span-search attention: Superlinear multi-step attention with N = 2 (Huang, arXiv 2601.18401;
concavity-ai/superlinear), "jump search" over O(sqrt(t)) anchors, cost O(L^1.5).

For a query at key position t = i + S - T (bottom-right; strictly causal):

  W       = (w + 1)^2 - 1                  sliding window, w = ``sw_index``; Win(t) = [t - W + 1, t]
  a_i(t)  = t - i^2 + 1,  i = w+1, w+2, … while a_i >= 0      anchors (the first is t - W)
  σ_i     = q_t · k[a_i]                   search score (raw dot product, no 1/sqrt(d))
  J       = top-``num_spans`` anchors by σ; ties to the more recent anchor (spec §0)
  ℓ_b     = ceil(b (t+1)^s),  ℓ_f = ceil(f (t+1)^s)      b = backward_factor, f = forward_factor,
                                                          s = span_power
  span(a) = [max(0, a - ℓ_b), min(a + ℓ_f, t, t - W)]    (inclusive; t - W only when W > 0)
  O_j     = softmax attention of q_t over span(a_j) ∪ Win(t)   (scale 1/sqrt(d) by default)
  ω       = softmax_j(σ_j), an unfilled slot scores -1e9 (all unfilled => O = window attention)
  out_t   = Σ_j ω_j O_j

The attention query doubles as the search query (the spec's Q_s = Q_a resolution when one query is
given). Per query head: each head searches with its own query. Gradients flow through the span
attentions and through ω (the search is trained by it); the choice of anchors is discrete.
The fast path runs on q's device with no host sync: queries go in fixed-size chunks (the last one
padded); each span is a run of L keys (L a static bound per chunk) copied out of an overlapping
strided view of K / V, masked to the span, and each chunk is one batched computation whose k
softmaxes and shared window fold into one weight per key. O(T · k · sqrt(S)) work, O(chunk · k ·
sqrt(S)) memory per chunk, under activation checkpointing, so memory stays linear in T.

No log-sum-exp (``has_lse=False``; ``attention_lse`` refuses the mechanism). Each slot's O_j is one
softmax over span(a_j) ∪ Win(t) with its own LSE l_j, but out_t = Σ_j ω_j O_j is a mixture of
separately normalized softmaxes (spec §4.2: O_j is its own SDPA; overlapping spans count twice):
as one distribution over keys, a span key weighs ω_j e^{s - l_j} and a window key Σ_j ω_j e^{s - l_j},
factors that depend on every key of every slot. Merging partial results over key shards needs all
num_spans LSEs per row, so no single LSE exists. (With num_spans = 1, ω = 1 and the row is one
softmax over the disjoint span ∪ window; a record's capabilities do not depend on options, so the
mechanism still declares none.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, nonnegative_int, positive_int, resolve_scale
from attnlab.spec import Impl, Kind, Mechanism

DEFAULTS = {"num_spans": 3, "sw_index": 3, "backward_factor": 2.0, "forward_factor": 0.0, "span_power": 0.5}
_CHUNK = 64  # queries per gathered chunk (~100 MB of gathered spans at H=8, S=16K)


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    if not causal:
        raise ValueError("span_search is causal by construction (anchors lie in the past); call it with causal=True")
    out = {"num_spans": positive_int("num_spans", opts["num_spans"])}
    out["sw_index"] = nonnegative_int("sw_index", opts["sw_index"])
    for name in ("backward_factor", "forward_factor", "span_power"):
        x = opts[name]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 or not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
        out[name] = float(x)
    return out


def _anchors(t: Tensor, w: int, n: int) -> tuple[Tensor, Tensor]:
    """Anchor positions [..., n] for positions t [...] and their validity."""
    i = torch.arange(w + 1, w + 1 + n, device=t.device)
    a = t.unsqueeze(-1) - i * i + 1
    return a, a >= 0


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """Gather sequence rows: x [B, Hkv, S, E], idx [B or 1, H or 1, *shape] -> [B, H, *shape, E];
    query head h reads kv head h // (H / Hkv), so GQA needs no repeated copy of K or V.

    One index_select over a flat [B*Hkv*S, E] view: plain row copies, far faster than broadcast
    advanced indexing for the millions of span rows a call touches."""
    B, Hkv, S, E = x.shape
    H = max(idx.shape[1], Hkv)
    idx = idx.expand(B, H, *idx.shape[2:])
    heads = torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1).expand(B, Hkv, H // Hkv).reshape(B, H)
    flat = (idx + (heads * S).view(B, H, *([1] * (idx.dim() - 2)))).reshape(-1)
    return x.reshape(B * Hkv * S, E).index_select(0, flat).view(*idx.shape, E)


def _search(q: Tensor, k: Tensor, t: Tensor, opts: dict):
    """Top anchors for queries q [B, H, C, D] at positions t [C]: anchor [B,H,C,k], score, valid."""
    B, H, C, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    n = max(1, math.isqrt(S) + 1)
    a, valid = _anchors(t, opts["sw_index"], n)  # [C, n]
    keys = _rows(k, a.clamp(0, S - 1).view(1, 1, C, n))  # [B, Hkv, C, n, D]: shared by a GQA group
    sigma = torch.einsum("bgxcd,bgcnd->bgxcn", q.view(B, Hkv, H // Hkv, C, D), keys).reshape(B, H, C, n)
    ranked = torch.where(valid, sigma.detach(), float("-inf"))
    # ties to the more recent anchor = the lower i: a stable descending sort keeps index order
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., : opts["num_spans"]]
    ok = torch.gather(valid.expand_as(sigma), -1, order)
    score = torch.where(ok, torch.gather(sigma, -1, order), torch.full_like(sigma[..., :1], -1e9))
    return torch.gather(a.expand_as(sigma), -1, order), score, ok


def _span_lengths(t: Tensor | int, opts: dict):
    """ℓ_b, ℓ_f for positions t (a tensor, or a Python int for a static bound)."""
    if isinstance(t, int):
        grow = float(t + 1) ** opts["span_power"]
        return math.ceil(opts["backward_factor"] * grow), math.ceil(opts["forward_factor"] * grow)
    grow = (t + 1).double() ** opts["span_power"]
    return torch.ceil(opts["backward_factor"] * grow).long(), torch.ceil(opts["forward_factor"] * grow).long()


def _bounds(t: Tensor, anchor: Tensor, opts: dict):
    """Inclusive span [lo, hi] per selected anchor and the window start, for positions t."""
    W = (opts["sw_index"] + 1) ** 2 - 1
    lb, lf = _span_lengths(t, opts)
    tt = t.view(1, 1, -1, 1)
    lo = torch.clamp(anchor - lb.view(1, 1, -1, 1), min=0)
    hi = torch.minimum(anchor + lf.view(1, 1, -1, 1), tt - W if W > 0 else tt)
    return lo, hi, W


class _Windows(torch.autograd.Function):
    """rows [N, E] (contiguous), start [M] -> rows start .. start + L - 1 for each start, [M, L, E].

    Forward: one index_select over an overlapping strided view of the rows (plain slab copies, no
    [M, L] index tensor). Backward: one index_add of the [M * L] rows' gradients."""

    @staticmethod
    def forward(ctx, rows: Tensor, start: Tensor, L: int) -> Tensor:
        N, E = rows.shape
        ctx.save_for_backward(start)
        ctx.n, ctx.L = N, L
        return rows.as_strided((N - L + 1, L, E), (E, E, 1)).index_select(0, start)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (start,) = ctx.saved_tensors
        idx = (start.unsqueeze(1) + torch.arange(ctx.L, device=start.device)).flatten()  # [M * L]
        out = grad.new_zeros(ctx.n, grad.shape[-1]).index_add_(0, idx, grad.reshape(-1, grad.shape[-1]))
        return out, None, None


def _spans(x: Tensor, start: Tensor, L: int) -> Tensor:
    """x [B, Hkv, N, E], start [B, H, C, k] in [0, N - L] -> rows start .. start + L - 1 of each query
    head's kv head (h // (H / Hkv)): [B, H, C, k, L, E]."""
    B, Hkv, N, E = x.shape
    H = start.shape[1]
    heads = torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1).expand(B, Hkv, H // Hkv).reshape(B, H, 1, 1)
    rows = x.contiguous().view(B * Hkv * N, E)  # the strided view below assumes packed rows
    return _Windows.apply(rows, (start + heads * N).flatten(), L).view(*start.shape, L, E)


def _chunk(q: Tensor, k: Tensor, kp: Tensor, vp: Tensor, t0: int, front: int, scale: float, opts: dict, L: int):
    """Outputs [B, H, C, Dv] for queries q [B, H, C, D] at positions t0 .. t0 + C - 1; k [B, Hkv, S, D];
    kp, vp: k, v with ``front`` zero rows before and C after (every window and span a slice).
    L: a bound on the spans' lengths, <= S.

    Each query attends over its k spans (each a run of L keys, masked to the span) and its window;
    the k softmaxes share the window, so everything folds into one weight per key:
      out = Σ_j ω_j O_j = Σ_j Σ_{l ∈ span_j} ω_j e^{s_l - lse_j} v_l + Σ_{w ∈ Win} e^{s_w + c} v_w,
      c = log Σ_j ω_j e^{-lse_j}                     (in log space: no 0 · inf anywhere)."""
    B, H, C, D = q.shape
    Hkv, S, dev = k.shape[1], k.shape[2], q.device
    t = torch.arange(t0, t0 + C, device=dev)
    anchor, score, ok = _search(q, k, t, opts)  # [B, H, C, k]
    lo, hi, W = _bounds(t, anchor, opts)

    start = lo.clamp(max=S - L)  # each span's run of L keys stays inside the sequence
    l = torch.arange(L, device=dev)
    last = torch.where(ok, hi - start, -1).unsqueeze(-1)  # an unfilled slot keeps no key
    span_ok = (l >= (lo - start).unsqueeze(-1)) & (l <= last)  # [B, H, C, k, L]
    s_span = torch.einsum("bhcd,bhcjld->bhcjl", q, _spans(kp, start + front, L)) * scale
    s_span = torch.where(span_ok, s_span, float("-inf"))

    # the window of t is keys t - Wp + 1 .. t: consecutive queries read an overlapping strided view
    Wp = max(W, 1)
    rows = slice(t0 + front - Wp + 1, t0 + front + C)
    win_k, win_v = (x[:, :, rows].unfold(2, Wp, 1) for x in (kp, vp))  # [B, Hkv, C, D, Wp]
    win_ok = (t.view(-1, 1) - Wp + 1 + torch.arange(Wp, device=dev) >= 0) & (W > 0)  # [C, Wp]
    qg = q.view(B, Hkv, H // Hkv, C, D)
    s_win = torch.einsum("bgxcd,bgcdw->bgxcw", qg, win_k).reshape(B, H, C, Wp) * scale
    s_win = torch.where(win_ok, s_win, float("-inf"))

    lse_w = torch.logsumexp(s_win, -1, keepdim=True)  # [B, H, C, 1]
    lse = torch.logaddexp(torch.logsumexp(s_span, -1), lse_w)  # [B, H, C, k]: one softmax per span
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    log_omega = torch.log_softmax(score, -1)  # [B, H, C, k]
    p_span = torch.exp(s_span + (log_omega - safe).unsqueeze(-1))  # ω_j e^{s - lse_j}
    c = torch.logsumexp(log_omega - safe, -1, keepdim=True)  # [B, H, C, 1]
    p_win = torch.exp(s_win + c).view(B, Hkv, H // Hkv, C, Wp)
    out = torch.einsum("bhcjl,bhcjld->bhcd", p_span, _spans(vp, start + front, L))
    return out + torch.einsum("bgxcw,bgcdw->bgxcd", p_win, win_v).reshape(B, H, C, -1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    num_spans=3,
    sw_index=3,
    backward_factor=2.0,
    forward_factor=0.0,
    span_power=0.5,
) -> AttentionOutput:
    """Every query's spans, in chunks of _CHUNK queries (the last one padded), each chunk one batched
    computation on q's device with no host sync: O(T k sqrt(S)) work in all, O(_CHUNK k sqrt(S))
    memory per chunk. Under autograd each chunk is checkpointed, so memory stays linear in T."""
    opts = {
        "num_spans": num_spans,
        "sw_index": sw_index,
        "backward_factor": backward_factor,
        "forward_factor": forward_factor,
        "span_power": span_power,
    }
    scale = resolve_scale(scale, q.shape[-1])
    B, H, T, D = q.shape
    S, dev = k.shape[2], q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = min(_CHUNK, max(T, 1))
    front = max((sw_index + 1) ** 2 - 1, 1) + max(0, T - S)  # the earliest window starts at padded row 1
    qc = F.pad(q.to(ct), (0, 0, 0, -T % C))  # padded rows sit past the last key; their outputs are dropped
    kc = k.to(ct).contiguous()
    kp, vp = (F.pad(x.to(ct), (0, 0, front, C)) for x in (k, v))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for c0 in range(0, T, C):  # fixed-size query chunks bound the memory
        t0 = c0 + S - T
        # a static bound on the chunk's span lengths (+1: Python's pow may round apart from torch's)
        lb, lf = _span_lengths(max(min(c0 + C, T) - 1 + S - T, 0), opts)
        args = (qc[:, :, c0 : c0 + C], kc, kp, vp, t0, front, scale, opts, max(1, min(lb + lf + 2, S)))
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    out = torch.cat(outs, dim=2)[:, :, :T] if outs else qc.new_zeros(B, H, 0, v.shape[-1])
    rows_empty = (torch.arange(T, device=dev) + S - T < 0).view(1, 1, T, 1)
    return AttentionOutput(torch.where(rows_empty, 0.0, out).to(q.dtype), None)


def oracle(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale=None, **opts) -> _reference.Reference:
    """O(T*S) reference: the per-(t, j) masks built explicitly, one dense attention per span slot."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = resolve_scale(scale, D)
    t = torch.arange(T, device=q.device) + S - T
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    anchor, score, ok = _search(q.to(ct), k.to(ct), t, opts)
    lo, hi, W = _bounds(t, anchor, opts)
    j = torch.arange(S, device=q.device).view(1, 1, 1, S)
    tt = t.view(1, 1, T, 1)
    window = (j <= tt) & (j > tt - W) & (W > 0)
    out = 0
    omega = torch.softmax(score, -1)
    for slot in range(opts["num_spans"]):
        span = (j >= lo[..., slot : slot + 1]) & (j <= hi[..., slot : slot + 1]) & ok[..., slot : slot + 1]
        o = _reference.attention(q, k, v, (span | window) & (tt >= 0), scale=scale).out
        out = out + omega[..., slot : slot + 1] * o.to(omega.dtype)
    return _reference.Reference(out.to(q.dtype), None, None)


SPEC = Mechanism(
    "span_search",
    "Superlinear multi-step attention (N=2 jump search), arXiv 2601.18401",
    Kind.COMPOSITE,  # one softmax per span slot: the oracle builds their masks
    {"chunked": Impl(attention)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="a mixture of num_spans softmaxes (one per span slot) weighted by the search scores: each slot "
    "has an LSE, the mixture none",
    patterns=frozenset({"self_causal", "cross_causal"}),
    example=lambda S: {"num_spans": 2, "sw_index": 1, "backward_factor": 1.0, "forward_factor": 0.5},
    oracle=oracle,
)

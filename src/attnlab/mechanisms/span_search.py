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
The fast path processes queries in chunks, gathering each chunk's spans (O(chunk · k · sqrt(S))
memory) under activation checkpointing, so memory stays linear in T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, nonnegative_int, positive_int, repeat_kv, resolve_scale

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
    """Gather sequence rows: x [B, H, S, E], idx [B or 1, H or 1, *shape] -> [B, H, *shape, E].

    One index_select over a flat [B*H*S, E] view: plain row copies, far faster than broadcast
    advanced indexing for the millions of span rows a call touches."""
    B, H, S, E = x.shape
    idx = idx.expand(B, H, *idx.shape[2:])
    base = (torch.arange(B * H, device=x.device) * S).view(B, H, *([1] * (idx.dim() - 2)))
    flat = (idx + base).reshape(-1)
    return x.reshape(B * H * S, E).index_select(0, flat).view(*idx.shape, E)


def _search(q: Tensor, k: Tensor, t: Tensor, opts: dict):
    """Top anchors for queries q [B, H, C, D] at positions t [C]: anchor [B,H,C,k], score, valid."""
    B, H, C, D = q.shape
    S = k.shape[2]
    n = max(1, math.isqrt(S) + 1)
    a, valid = _anchors(t, opts["sw_index"], n)  # [C, n]
    keys = _rows(repeat_kv(k, H // k.shape[1]), a.clamp(min=0).view(1, 1, C, n))  # [B, H, C, n, D]
    sigma = torch.einsum("bhcd,bhcnd->bhcn", q, keys)
    ranked = torch.where(valid, sigma.detach(), float("-inf"))
    # ties to the more recent anchor = the lower i: a stable descending sort keeps index order
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., : opts["num_spans"]]
    ok = torch.gather(valid.expand_as(sigma), -1, order)
    score = torch.where(ok, torch.gather(sigma, -1, order), torch.full_like(sigma[..., :1], -1e9))
    return torch.gather(a.expand_as(sigma), -1, order), score, ok


def _bounds(t: Tensor, anchor: Tensor, opts: dict):
    """Inclusive span [lo, hi] per selected anchor and the window start, for positions t."""
    W = (opts["sw_index"] + 1) ** 2 - 1
    grow = (t + 1).double() ** opts["span_power"]
    lb = torch.ceil(opts["backward_factor"] * grow).long()
    lf = torch.ceil(opts["forward_factor"] * grow).long()
    tt = t.view(1, 1, -1, 1)
    lo = torch.clamp(anchor - lb.view(1, 1, -1, 1), min=0)
    hi = torch.minimum(anchor + lf.view(1, 1, -1, 1), tt - W if W > 0 else tt)
    return lo, hi, W


def _chunk(q: Tensor, k: Tensor, v: Tensor, t: Tensor, scale: float, opts: dict) -> Tensor:
    """Outputs for queries q [B, H, C, D] at positions t [C]."""
    B, H, C, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    anchor, score, ok = _search(q, k, t, opts)
    lo, hi, W = _bounds(t, anchor, opts)
    span_len = int((hi - lo + 1).clamp(min=0).max()) if ok.any() else 0
    kk, vv = repeat_kv(k, G), repeat_kv(v, G)

    # window keys, shared by the k span attentions of a query: [B, H, C, W]
    win_pos = t.view(-1, 1) - W + 1 + torch.arange(max(W, 1))
    win_ok = (win_pos >= 0) & (W > 0)
    win_idx = win_pos.clamp(0, S - 1).view(1, 1, *win_pos.shape)
    kw, vw = _rows(kk, win_idx), _rows(vv, win_idx)  # [B, H, C, W, D]
    s_win = torch.einsum("bhcd,bhcwd->bhcw", q, kw) * scale
    s_win = s_win.masked_fill(~win_ok, float("-inf"))

    # span keys: [B, H, C, k, L]
    pos = lo.unsqueeze(-1) + torch.arange(max(span_len, 1))
    span_ok = (pos <= hi.unsqueeze(-1)) & ok.unsqueeze(-1) & (span_len > 0)
    idx = pos.clamp(0, S - 1)
    ks, vs = _rows(kk, idx), _rows(vv, idx)  # [B, H, C, k, L, D]
    s_span = torch.einsum("bhcd,bhcjld->bhcjl", q, ks) * scale
    s_span = s_span.masked_fill(~span_ok, float("-inf"))

    # one softmax per span over span ∪ window, merged through log-sum-exp
    lse_w = torch.logsumexp(s_win, -1).unsqueeze(-1)  # [B, H, C, 1]
    lse = torch.logaddexp(torch.logsumexp(s_span, -1), lse_w)  # [B, H, C, k]
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    p_span = torch.exp(s_span - safe.unsqueeze(-1))
    p_win = torch.exp(s_win.unsqueeze(3) - safe.unsqueeze(-1))  # [B, H, C, k, W]
    o = torch.einsum("bhcjl,bhcjld->bhcjd", p_span, vs) + torch.einsum("bhcjw,bhcwd->bhcjd", p_win, vw)
    omega = torch.softmax(score, -1)  # [B, H, C, k]
    return torch.einsum("bhcj,bhcjd->bhcd", omega, o)


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
    opts = {
        "num_spans": num_spans,
        "sw_index": sw_index,
        "backward_factor": backward_factor,
        "forward_factor": forward_factor,
        "span_power": span_power,
    }
    scale = resolve_scale(scale, q.shape[-1])
    T, S = q.shape[2], k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    outs = []
    for c0 in range(0, T, _CHUNK):
        t = torch.arange(c0, min(T, c0 + _CHUNK)) + S - T
        chunk = qc[:, :, c0 : c0 + _CHUNK]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            outs.append(checkpoint(_chunk, chunk, kc, vc, t, scale, opts, use_reentrant=False))
        else:
            outs.append(_chunk(chunk, kc, vc, t, scale, opts))
    out = torch.cat(outs, dim=2)
    rows_empty = (torch.arange(T) + S - T < 0).view(1, 1, T, 1)
    return AttentionOutput(torch.where(rows_empty, 0.0, out).to(q.dtype), None)


def oracle(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale=None, **opts) -> _reference.Reference:
    """O(T*S) reference: the per-(t, j) masks built explicitly, one dense attention per span slot."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = resolve_scale(scale, D)
    t = torch.arange(T) + S - T
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    anchor, score, ok = _search(q.to(ct), k.to(ct), t, opts)
    lo, hi, W = _bounds(t, anchor, opts)
    j = torch.arange(S).view(1, 1, 1, S)
    tt = t.view(1, 1, T, 1)
    window = (j <= tt) & (j > tt - W) & (W > 0)
    out = 0
    omega = torch.softmax(score, -1)
    for slot in range(opts["num_spans"]):
        span = (j >= lo[..., slot : slot + 1]) & (j <= hi[..., slot : slot + 1]) & ok[..., slot : slot + 1]
        o = _reference.attention(q, k, v, (span | window) & (tt >= 0), scale=scale).out
        out = out + omega[..., slot : slot + 1] * o.to(omega.dtype)
    return _reference.Reference(out.to(q.dtype), None, None)

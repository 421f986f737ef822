"""Relaxed attention variants from "Deconstructing Attention: Investigating Design Principles for
Effective Language Modeling" (Xue, Moosavi, Aletras; arXiv 2510.11602), plus the two non-softmax
normalizations that are not linear attention. One mechanism, three ``kind`` values:

* ``kind="fixed"``: input-independent weights (the paper's sequence-independent variants). A given
  non-negative ``weights`` tensor [T, S] or [H, T, S] (or the uniform pattern when ``weights=None``)
  restricted to the allowed keys and normalized by its row sum:

      P[t, j] = W[t, j] · allowed[t, j] / Σ_j' W[t, j'] · allowed[t, j']        out = P V

  q and k do not enter (their gradients are zero). A learned pattern passes its own tensor (see
  :class:`attnlab.nn.FixedPatternAttention`, which softmax-normalizes a logits table first); the
  renormalization here then changes nothing on its allowed entries.
* ``kind="sigmoid"``: σ(s·q·k + b) per key with no row normalization (sigmoid attention, Ramapuram
  et al., arXiv 2409.04431). ``bias=None`` means b = −log(S), that paper's recommended constant, with
  S the key length of the call (not the number of allowed keys, so causal rows are not rescaled).
* ``kind="relu"``: relu(s·q·k) / row sum, the normalized ReLU of the paper's "different
  mathematical form" variants. A row whose ReLUs are all 0 (or with no allowed key) outputs 0.

Spec ambiguities resolved here (the spec has no section for this mechanism):
* "fixed" weights are normalized by row sum, not by softmax: a pattern is a matrix of non-negative
  weights, and the uniform default (plain average over the allowed keys) is then W = 1.
* Causal is bottom-right (query i sits at key i + S − T), as everywhere in the library; rows with
  no allowed key, or with zero total weight, output exactly 0 for every kind.
* No kind has a log-sum-exp (``has_lse=False``; ``attention_lse`` refuses the mechanism): none is
  a softmax. "fixed" and "relu" rows divide by a plain row sum, "sigmoid" rows by nothing, so both
  paths return ``lse=None``.

The fast path runs over chunks of queries under activation checkpointing, so the scores it holds
are [B, H, chunk, S] (``CHUNK_ELEMENTS`` at most) in the forward and the backward alike; causal
chunks only visit the keys their last row can see. The uniform pattern needs no scores at all:
a prefix mean (cumsum) causally, one mean otherwise, O(S·Dv) memory.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, compute_dtype, repeat_kv, resolve_scale
from attnlab.spec import Impl, Kind, Mechanism, Workloads

KINDS = ("fixed", "sigmoid", "relu")
DEFAULTS = {"kind": "fixed", "weights": None, "bias": None}
CHUNK_ELEMENTS = 1 << 22  # scores per query chunk, [B, H, chunk, S]: 16 MiB in fp32


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    kind, weights, bias = opts["kind"], opts["weights"], opts["bias"]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if weights is not None:
        if kind != "fixed":
            raise ValueError(f"weights applies only to kind='fixed', got kind={kind!r}")
        _check_weights(weights, T, S)
    if bias is not None:
        if kind != "sigmoid":
            raise ValueError(f"bias applies only to kind='sigmoid', got kind={kind!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"bias must be a finite number or None (= -log(S)), got {bias!r}")
    out = dict(opts)
    if kind == "sigmoid":
        out["bias"] = float(-math.log(max(S, 1)) if bias is None else bias)
    return out


def _check_weights(w, T: int, S: int) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() not in (2, 3):
        raise ValueError(f"weights must be a float tensor [T, S] or [H, T, S], got {_describe(w)}")
    if tuple(w.shape[-2:]) != (T, S):
        raise ValueError(f"weights must be [T, S] or [H, T, S] with T={T}, S={S}, got {tuple(w.shape)}")
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and non-negative (they are normalized by row sum)")


def _describe(w) -> str:
    return f"shape {tuple(w.shape)} {w.dtype}" if isinstance(w, Tensor) else type(w).__name__


def _head_weights(w: Tensor, H: int, device, dtype) -> Tensor:
    """[T, S] or [H', T, S] -> [1 or H, T, S]."""
    w = w.unsqueeze(0) if w.dim() == 2 else w
    if w.shape[0] not in (1, H):
        raise ValueError(f"weights must have 1 or H={H} heads, got {w.shape[0]}")
    return w.to(device=device, dtype=dtype)


# -- fast path ----------------------------------------------------------------------------------------


def _uniform(v: Tensor, H: int, T: int, causal: bool, ct: torch.dtype) -> Tensor:
    """The plain average of the allowed values: v [B, Hkv, S, Dv] -> [B, H, T, Dv], no scores."""
    B, Hkv, S, Dv = v.shape
    if S == 0:
        return v.new_zeros(B, H, T, Dv, dtype=ct)
    vc = v.to(ct)
    if not causal:
        out = vc.mean(dim=2, keepdim=True).expand(B, Hkv, T, Dv).contiguous()  # callers may write in place
    else:
        pos = torch.arange(T, device=v.device) + (S - T)  # key position of each query row
        prefix = vc.cumsum(dim=2)[:, :, pos.clamp(0, S - 1)]  # [B, Hkv, T, Dv]
        out = torch.where(pos.view(T, 1) >= 0, prefix / (pos + 1).clamp(min=1).view(T, 1).to(ct), 0.0)
    return repeat_kv(out, H // Hkv)


def _numerators(kind: str, qc, kc, w, scale: float, bias) -> Tensor:
    """Unnormalized weights of one chunk against keys kc: [B, Hkv, g, C, s], or [1|Hkv, 1|g, C, s] for
    given weights (they broadcast over the batch in the matmul)."""
    B, Hkv, g, C, D = qc.shape
    if kind == "fixed":
        return w.reshape(1 if w.shape[0] == 1 else Hkv, 1 if w.shape[0] == 1 else g, C, -1)
    # scale folded into q (C x D work, not C x s); in-place ops on the fresh matmul output are
    # autograd-safe (matmul does not keep its output; sigmoid/relu keep theirs)
    z = ((qc * scale).reshape(B, Hkv, g * C, D) @ kc.transpose(-1, -2)).view(B, Hkv, g, C, -1)
    return z.add_(bias).sigmoid_() if kind == "sigmoid" else z.relu_()


def _chunk(qc, kc, vc, w, *, kind: str, scale: float, bias, causal: bool, offset: int):
    """One query chunk. qc [B, Hkv, g, C, D], kc [B, Hkv, s, D], vc [B, Hkv, s, Dv], w [1|H, C, s] or
    None; ``offset`` = key position of the chunk's first row. Returns [B, Hkv, g, C, Dv].

    Keys split in two: those every row of the chunk sees (j <= offset; no mask at all) and the
    causal diagonal (j > offset, masked by the chunk's own predicate j <= offset + row). The row
    normalization divides the [C, Dv] output instead of the [C, s] weights.
    """
    B, Hkv, g, C, _ = qc.shape
    s = kc.shape[2]
    split = min(max(offset + 1, 0), s) if causal else s
    out = den = 0
    for lo, hi in ((0, split), (split, s)):
        if hi <= lo:
            continue
        p = _numerators(kind, qc, kc[:, :, lo:hi], None if w is None else w[..., lo:hi], scale, bias)
        if lo == split:  # the diagonal part: row r sees keys j <= offset + r
            j = torch.arange(lo, hi, device=kc.device)
            p = torch.where(j.view(1, -1) <= torch.arange(C, device=kc.device).view(C, 1) + offset, p, 0.0)
        rows = p.shape[-4:-2]  # (Hkv or 1, g or 1): fold the heads sharing a kv head into the rows
        out = out + (p.flatten(-3, -2) @ vc[:, :, lo:hi]).unflatten(-2, (rows[1], C))  # [B, Hkv, g|1, C, Dv]
        if kind != "sigmoid":
            den = den + p.sum(-1, keepdim=True)
    if kind != "sigmoid":  # rows with zero total weight have out = 0 too: divide by 1 there
        out = out / torch.where(den > 0, den, 1.0)
    return out.expand(B, Hkv, g, C, vc.shape[-1])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kind: str = "fixed",
    weights: Tensor | None = None,
    bias: float | None = None,
) -> AttentionOutput:
    """q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> (out [B,H,T,Dv], None), chunked over queries."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    g, ct = H // Hkv, compute_dtype(q.dtype)
    if kind == "fixed" and weights is None:
        return AttentionOutput(_uniform(v, H, T, causal, ct).to(q.dtype), None)
    w = None if weights is None else _head_weights(weights, H, q.device, ct)
    scale = resolve_scale(scale, D)
    qg = q.to(ct).view(B, Hkv, g, T, D)  # the query heads of one kv head fold into its rows
    kc, vc = k.to(ct), v.to(ct)
    rows = max(1, CHUNK_ELEMENTS // max(1, B * H * S))
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, w))
    fn = functools.partial(_chunk, kind=kind, scale=scale, bias=bias, causal=causal)
    outs = []
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        hi = min(S, r1 + S - T) if causal else S  # keys the chunk's last row can see
        if hi <= 0:
            outs.append(vc.new_zeros(B, Hkv, g, r1 - r0, Dv))
            continue
        args = (qg[:, :, :, r0:r1], kc[:, :, :hi], vc[:, :, :hi], None if w is None else w[:, r0:r1, :hi])
        call = functools.partial(fn, offset=r0 + S - T)
        outs.append(checkpoint(call, *args, use_reentrant=False) if track else call(*args))
    out = torch.cat(outs, dim=3).reshape(B, H, T, Dv)
    return AttentionOutput(out.to(q.dtype), None)


# -- dense oracle -------------------------------------------------------------------------------------


def oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale=None,
    kind: str = "fixed",
    weights: Tensor | None = None,
    bias: float | None = None,
) -> _reference.Reference:
    """Materializes P [B, H, T, S] from the definitions above; ``weights`` are P, lse is None."""
    B, H, Hkv, T, S, D, _ = check_qkv(q, k, v)
    scale = resolve_scale(scale, D)
    ct = compute_dtype(q.dtype)
    allowed = _reference.causal_mask(T, S, q.device) if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
    zero = torch.zeros((), dtype=ct, device=q.device)
    if kind == "fixed":
        w = torch.ones(1, T, S, dtype=ct, device=q.device) if weights is None else None
        w = _head_weights(weights, H, q.device, ct) if w is None else w
        n = torch.where(allowed, w, zero)  # [1|H, T, S]
        den = n.sum(-1, keepdim=True)
        p = torch.where(den > 0, n / torch.where(den > 0, den, 1.0), zero).expand(B, H, T, S)
    else:
        logits = torch.einsum("bhtd,bhsd->bhts", q.to(ct), repeat_kv(k.to(ct), H // Hkv)) * scale
        if kind == "sigmoid":
            p = torch.where(allowed, torch.sigmoid(logits + bias), zero)
        else:
            n = torch.where(allowed, torch.relu(logits), zero)
            den = n.sum(-1, keepdim=True)
            p = torch.where(den > 0, n / torch.where(den > 0, den, 1.0), zero)
    out = torch.einsum("bhts,bhsd->bhtd", p, repeat_kv(v.to(ct), H // Hkv))
    return _reference.Reference(out.to(q.dtype), p, None)


SPEC = Mechanism(
    "fixed_pattern",
    "Deconstructing Attention, arXiv 2510.11602; sigmoid attention, arXiv 2409.04431",
    Kind.RELAXED,
    {"chunked": Impl(attention, traced=True)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="no softmax: fixed patterns and ReLU are normalized by a plain row sum, sigmoid not at all",
    drop_in=False,  # not softmax weights: no stand-in for a pretrained softmax layer
    example=lambda S: {"kind": "relu"},
    workloads=Workloads(efficiency=lambda T: {"kind": "sigmoid"}),  # uniform is a prefix mean; time q.k scores
    oracle=oracle,
)

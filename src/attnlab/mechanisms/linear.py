"""Kernelized linear attention (Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", arXiv 2006.16236), in three forms that agree: a
parallel form (the oracle), a chunked form (the fast path), and a recurrent form for decoding.

The rule, for a feature map phi and an optional per-head decay gamma in (0, 1) (``lightning`` passes
one; plain linear attention has none, i.e. gamma = 1)::

    w[t, j]  = scale * phi(q_t) . phi(k_j) * gamma ** dist(t, j)        # dist = |p_t - j|
    num_t    = sum_j allowed(t, j) * w[t, j] * v_j
    out_t    = num_t / max(sum_j allowed(t, j) * w[t, j], EPS)   (normalized maps: elu+1, relu)
    out_t    = num_t                                              (identity: no denominator)

with query t at key position ``p_t = t + S - T`` (bottom-right, as everywhere in attnlab). Causal:
``allowed = j <= p_t`` (the current token included, fla/Lightning semantics). Non-causal: every
query sees every key.

Choices where the papers leave room (spec §0, §7.2, §7.6, §14):

* Normalization is fixed by the feature map. elu+1 and relu give non-negative features, so
  ``num / den`` is a convex combination of values and is normalized as in Katharopoulos et al.
  identity features can make ``den`` cross zero, so they are never normalized (the Lightning/SALA
  form, spec §7.2: "NO normaliser"); the 1/sqrt(D) scale keeps magnitudes in check instead.
* The denominator is clamped at EPS = 1e-6 instead of Katharopoulos' ``den + eps``: exact whenever
  ``den >= EPS``, and a zero denominator (relu features that miss every key, or a causal row with
  no key) gives ``num / EPS = 0``, never NaN, with finite gradients. Below EPS the row shrinks
  smoothly toward 0, so the chunked and parallel forms still agree.
* ``scale`` multiplies the similarity for every map; it cancels in normalized maps except against
  EPS. Features are computed in fp32 (fp64 for fp64 inputs) and states are kept in that dtype.
* Non-causal with a decay uses the symmetric distance ``gamma ** |p_t - j|`` (the bidirectional
  reading, as in vision RetNets); causal uses ``gamma ** (p_t - j)`` over ``j <= p_t``.
* The decay is fixed (spec §7.2: "fixed, not learned"); no gradient flows to it.

The chunked form splits the sequence into chunks of ``chunk_size``: inside a chunk a masked
(decayed) C x C product, across chunks a running state ``S = sum_j gamma**(...) phi(k_j)^T v_j``
([F, Dv], plus ``z = sum_j phi(k_j)`` folded in as an extra all-ones value column for normalized
maps). Memory is O(T * (C + D)), never T x S. The recurrent form is the same chunked core run on
new tokens with an incoming state, so one decode step costs O(D * Dv) whatever came before.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, compute_dtype, positive_int, repeat_kv, resolve_scale

EPS = 1e-6
FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "identity": lambda x: x,
}
NORMALIZED = {"elu+1": True, "relu": True, "identity": False}
CHUNK_SIZE = 64  # tuned on 2 CPU cores at T=64K, D=64 (see the report in README)
DEFAULTS = {"feature_map": "elu+1", "chunk_size": CHUNK_SIZE}


class LinearState(NamedTuple):
    """The recurrent state after the tokens seen so far, per query head, in the compute dtype."""

    kv: Tensor  # [B, H, D, Dv]   sum_j gamma**(t-j) phi(k_j)^T v_j
    z: Tensor | None  # [B, H, D]   sum_j gamma**(t-j) phi(k_j); None for unnormalized maps


class RecurrentOutput(NamedTuple):
    output: Tensor  # [B, H, T, Dv] in q.dtype
    state: LinearState


def check_feature_map(value: object) -> str:
    if not isinstance(value, str) or value not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}, got {value!r}")
    return value


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    return {
        "feature_map": check_feature_map(opts["feature_map"]),
        "chunk_size": positive_int("chunk_size", opts["chunk_size"]),
    }


# -- shared pieces: features in, normalization out ------------------------------------------------


def _features(q: Tensor, k: Tensor, v: Tensor, scale: float, feature_map: str):
    """phi(q) * scale [B,H,T,F], phi(k) [B,H,S,F] and values [B,H,S,E] in the compute dtype, kv heads
    repeated to the query heads (the decay is per query head). Normalized maps get E = Dv + 1: an
    all-ones value column whose output is the denominator, so one pass yields num and den."""
    ct, groups = compute_dtype(q.dtype), q.shape[1] // k.shape[1]
    phi = FEATURE_MAPS[feature_map]
    qf = phi(q.to(ct)) * scale
    kf = repeat_kv(phi(k.to(ct)), groups)
    vf = repeat_kv(v.to(ct), groups)
    if NORMALIZED[feature_map]:
        vf = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)
    return qf, kf, vf


def _finish(num: Tensor, feature_map: str, dtype: torch.dtype) -> Tensor:
    """[..., E] -> [..., Dv]: divide by the denominator column for normalized maps."""
    if NORMALIZED[feature_map]:
        num = num[..., :-1] / num[..., -1:].clamp_min(EPS)
    return num.to(dtype)


def _log_decay(decay: Tensor | None, like: Tensor) -> Tensor | None:
    return None if decay is None else torch.log(decay.to(device=like.device, dtype=like.dtype))


def _powers(log_g: Tensor, exponents: Tensor) -> Tensor:
    """gamma_h ** e for e >= 0: [H] x [...] -> [H, ...]; never overflows (exponent <= 0 in log)."""
    return torch.exp(log_g.view(-1, *([1] * exponents.dim())) * exponents.to(log_g.dtype))


# -- the chunked core ------------------------------------------------------------------------------


def _chunks(qf: Tensor, kf: Tensor, vf: Tensor, log_g: Tensor | None, state: Tensor | None):
    """Aligned sequences (query i at key position i) whose length L is a multiple of C = the chunk
    axis: qf [B,H,n,C,F], kf [B,H,n,C,F], vf [B,H,n,C,E]; state [B,H,F,E] or None (zeros).
    Returns num [B,H,n,C,E] and the state after the last token."""
    n, C = qf.shape[2], qf.shape[3]
    i = torch.arange(C, device=qf.device)
    below = i.view(C, 1) >= i.view(1, C)  # key j <= query i inside a chunk
    scores = qf @ kf.transpose(-1, -2)  # [B,H,n,C,C]
    if log_g is None:
        scores = scores.masked_fill(~below, 0.0)
        local = kf.transpose(-1, -2) @ vf  # [B,H,n,F,E]: each chunk's own contribution
        total = local.cumsum(2)
        before = torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], dim=2)  # exclusive
        if state is not None:
            before = before + state.unsqueeze(2)
        num = scores @ vf + qf @ before
        return num, before[:, :, -1] + local[:, :, -1]
    H = qf.shape[1]
    lg = log_g.view(1, H, 1, 1, 1)
    scores = scores * (_powers(log_g, (i.view(C, 1) - i.view(1, C)).clamp_min(0)) * below).view(1, H, 1, C, C)
    local = (kf * torch.exp(lg * (C - 1 - i).view(C, 1))).transpose(-1, -2) @ vf  # gamma**(C-1-j) k_j^T v_j
    per_chunk = torch.exp(log_g * C).view(1, H, 1, 1)  # a state crossing a whole chunk decays by gamma**C
    s = torch.zeros_like(local[:, :, 0]) if state is None else state
    before = []
    for c in range(n):  # n = L / C small steps on [B,H,F,E]; the heavy work above is batched
        before.append(s)
        s = s * per_chunk + local[:, :, c]
    before = torch.stack(before, dim=2)  # [B,H,n,F,E]: the state entering each chunk
    num = scores @ vf + (qf * torch.exp(lg * (i + 1).view(C, 1))) @ before
    return num, s


def _aligned(qf: Tensor, kf: Tensor, vf: Tensor, log_g: Tensor | None, chunk: int, state: Tensor | None):
    """Query i at key position i, L = T = S: num [B,H,L,E] and the final state. Full chunks run
    batched; the remainder runs as one shorter chunk that picks up their state."""
    B, H, L, Fd = qf.shape
    E = vf.shape[-1]
    full = (L // chunk) * chunk
    parts = []
    if full:
        n = full // chunk
        num, state = _chunks(
            qf[:, :, :full].reshape(B, H, n, chunk, Fd),
            kf[:, :, :full].reshape(B, H, n, chunk, Fd),
            vf[:, :, :full].reshape(B, H, n, chunk, E),
            log_g,
            state,
        )
        parts.append(num.reshape(B, H, full, E))
    if L > full:
        num, state = _chunks(
            qf[:, :, full:].unsqueeze(2), kf[:, :, full:].unsqueeze(2), vf[:, :, full:].unsqueeze(2), log_g, state
        )
        parts.append(num.squeeze(2))
    if state is None:  # L == 0
        state = qf.new_zeros(B, H, Fd, E)
    return torch.cat(parts, dim=2) if parts else vf.new_zeros(B, H, 0, E), state


def _prefix_state(kf: Tensor, vf: Tensor, log_g: Tensor | None) -> Tensor:
    """The state after keys [0, P): sum_j gamma**(P-1-j) phi(k_j)^T v_j -> [B,H,F,E], one matmul."""
    if log_g is not None:
        P = kf.shape[2]
        kf = kf * _powers(log_g, torch.arange(P - 1, -1, -1, device=kf.device)).unsqueeze(-1)
    return kf.transpose(-1, -2) @ vf


def _causal(qf: Tensor, kf: Tensor, vf: Tensor, log_g: Tensor | None, offset: int, chunk: int) -> Tensor:
    """Query t at key position offset + t sees keys j <= offset + t: num [B,H,T,E].

    Keys before the first query's position fold into an incoming state; queries before key 0 see
    nothing (0); queries past the last key see every key (zero keys pad the gap, so the decay keeps
    counting)."""
    T, S = qf.shape[2], kf.shape[2]
    lo = min(T, max(0, -offset))  # queries with no key
    P = min(S, max(0, offset))  # keys that precede every query
    state = _prefix_state(kf[:, :, :P], vf[:, :, :P], log_g) if P else None
    L = T - lo
    k_al, v_al = kf[:, :, P : P + L], vf[:, :, P : P + L]
    if k_al.shape[2] < L:
        k_al = F.pad(k_al, (0, 0, 0, L - k_al.shape[2]))
        v_al = F.pad(v_al, (0, 0, 0, L - v_al.shape[2]))
    num, _ = _aligned(qf[:, :, lo:], k_al, v_al, log_g, chunk, state)
    return F.pad(num, (0, 0, lo, 0))


def _noncausal(qf: Tensor, kf: Tensor, vf: Tensor, log_g: Tensor | None, chunk: int) -> Tensor:
    T, S = qf.shape[2], kf.shape[2]
    if log_g is None:
        return qf @ (kf.transpose(-1, -2) @ vf)  # [B,H,T,F] @ [B,H,F,E]
    # keys at or before p_t: the causal pass; keys after p_t: the causal pass over the reversed
    # sequences, where reversed query t' sits at position t' - 1 and sees gamma**((t'-1) - j') * gamma.
    ahead = _causal(qf, kf, vf, log_g, S - T, chunk)
    behind = _causal(qf.flip(2), kf.flip(2), vf.flip(2), log_g, -1, chunk).flip(2)
    return ahead + behind * torch.exp(log_g).view(1, -1, 1, 1)


# -- the three forms, for any feature map and an optional per-head decay [H] -----------------------


def chunked(q, k, v, *, causal=False, scale=None, feature_map="elu+1", decay=None, chunk_size=CHUNK_SIZE) -> Tensor:
    """The fast path: q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> [B,H,T,Dv]. ``decay`` [H] in
    (0, 1) or None. Memory linear in T and S."""
    sh = check_qkv(q, k, v)
    qf, kf, vf = _features(q, k, v, resolve_scale(scale, sh.D), feature_map)
    log_g = _log_decay(decay, qf)
    if causal:
        num = _causal(qf, kf, vf, log_g, sh.S - sh.T, chunk_size)
    else:
        num = _noncausal(qf, kf, vf, log_g, chunk_size)
    return _finish(num, feature_map, q.dtype)


def parallel(q, k, v, *, causal=False, scale=None, feature_map="elu+1", decay=None) -> _reference.Reference:
    """The oracle: materializes the [B,H,T,S] coefficients. Returns (out, weights, lse=None), where
    weights are the normalized coefficients (the raw ones for identity features)."""
    sh = check_qkv(q, k, v)
    qf, kf, vf = _features(q, k, v, resolve_scale(scale, sh.D), feature_map)
    pos = torch.arange(sh.T, device=q.device) + sh.S - sh.T
    dist = pos.view(-1, 1) - torch.arange(sh.S, device=q.device).view(1, -1)  # p_t - j  [T, S]
    coef = torch.ones(1, sh.T, sh.S, dtype=qf.dtype, device=q.device)
    if decay is not None:
        coef = _powers(_log_decay(decay, qf), dist.abs())  # [H, T, S]
    if causal:
        coef = coef * (dist >= 0)
    w = (qf @ kf.transpose(-1, -2)) * coef  # [B, H, T, S]
    if NORMALIZED[feature_map]:
        den = w.sum(-1, keepdim=True).clamp_min(EPS)
        w = w / den
        return _reference.Reference((w @ vf[..., :-1]).to(q.dtype), w, None)
    return _reference.Reference((w @ vf).to(q.dtype), w, None)


def _check_state(state: LinearState | None, qf: Tensor, Dv: int, feature_map: str) -> Tensor | None:
    """The public state -> the internal [B,H,F,E] (z as the last value column)."""
    if state is None:
        return None
    B, H, _, Fd = qf.shape
    if not isinstance(state, LinearState):
        raise TypeError(f"state must be a LinearState or None, got {type(state).__name__}")
    if tuple(state.kv.shape) != (B, H, Fd, Dv):
        raise ValueError(f"state.kv must be [B, H, D, Dv] = {[B, H, Fd, Dv]}, got {list(state.kv.shape)}")
    if NORMALIZED[feature_map] != (state.z is not None):
        need = "a z [B, H, D]" if NORMALIZED[feature_map] else "z=None"
        raise ValueError(f"state for feature_map={feature_map!r} needs {need}")
    kv = state.kv.to(device=qf.device, dtype=qf.dtype)
    if state.z is None:
        return kv
    if tuple(state.z.shape) != (B, H, Fd):
        raise ValueError(f"state.z must be [B, H, D] = {[B, H, Fd]}, got {list(state.z.shape)}")
    return torch.cat([kv, state.z.to(kv).unsqueeze(-1)], dim=-1)


def recurrent_form(
    q, k, v, state=None, *, scale=None, feature_map="elu+1", decay=None, chunk_size=CHUNK_SIZE
) -> RecurrentOutput:
    """New tokens (q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], causal among themselves) after the
    tokens summarized by ``state`` (None = nothing before). Returns (output [B,H,T,Dv], state)."""
    sh = check_qkv(q, k, v)
    if sh.T != sh.S:
        raise ValueError(f"the recurrent form takes the same new tokens as queries and keys: T={sh.T} != S={sh.S}")
    qf, kf, vf = _features(q, k, v, resolve_scale(scale, sh.D), feature_map)
    num, s = _aligned(qf, kf, vf, _log_decay(decay, qf), chunk_size, _check_state(state, qf, sh.Dv, feature_map))
    new = LinearState(s[..., :-1], s[..., -1]) if NORMALIZED[feature_map] else LinearState(s, None)
    return RecurrentOutput(_finish(num, feature_map, q.dtype), new)


# -- the registered mechanism: no decay ------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, feature_map="elu+1", chunk_size=CHUNK_SIZE) -> AttentionOutput:
    out = chunked(q, k, v, causal=causal, scale=scale, feature_map=feature_map, chunk_size=chunk_size)
    return AttentionOutput(out, None)


def oracle(q, k, v, *, causal=False, scale=None, feature_map="elu+1", chunk_size=CHUNK_SIZE) -> _reference.Reference:
    return parallel(q, k, v, causal=causal, scale=scale, feature_map=feature_map)


def recurrent(q, k, v, state=None, *, scale=None, feature_map="elu+1", chunk_size=CHUNK_SIZE) -> RecurrentOutput:
    """Decoding: feed tokens one at a time (T = 1) or a chunk at a time, carrying ``state``.

    >>> out, state = recurrent(q[:, :, :10], k[:, :, :10], v[:, :, :10])           # prefill
    >>> out, state = recurrent(q[:, :, 10:11], k[:, :, 10:11], v[:, :, 10:11], state)  # one step
    """
    positive_int("chunk_size", chunk_size)
    check_feature_map(feature_map)
    return recurrent_form(q, k, v, state, scale=scale, feature_map=feature_map, chunk_size=chunk_size)


__all__ = ["LinearState", "RecurrentOutput", "attention", "chunked", "oracle", "parallel", "recurrent"]

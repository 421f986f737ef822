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

The chunked form (``kernels/linear_chunks.py``) splits the sequence into chunks of ``chunk_size``:
inside a chunk a masked (decayed) C x C product, across chunks a running state
``kv = sum_j gamma**(...) phi(k_j)^T v_j`` [F, Dv] (and ``z = sum_j gamma**(...) phi(k_j)`` [F] for
the denominator). Memory is linear in T, never T x S; autograd runs through it (its saved tensors
are linear in T too). The recurrent form is the same core run on new tokens with an incoming state,
so one decode step costs O(D * Dv) whatever came before.

On CUDA, causal calls run flash-linear-attention's chunk kernels instead (``kernels/fla.py``, the
``fla`` impl, fla-core installed): the same rule, mapped onto fla's conventions there.

No log-sum-exp (``has_lse=False``; ``attention_lse`` refuses the mechanism): there is no softmax.
A normalized map's row is num / den with den a plain sum of feature products, so partial results
over key shards merge by adding (num, den), not by an LSE; identity features have no normalizer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, compute_dtype, positive_int, resolve_scale
from attnlab.kernels import fla as _fla
from attnlab.kernels import linear_chunks
from attnlab.spec import Impl, Kind, Mechanism

EPS = linear_chunks.EPS
FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x).add_(1.0),  # in place: elu's backward reads its input, not output
    "relu": F.relu,
    "identity": lambda x: x,
}
NORMALIZED = {"elu+1": True, "relu": True, "identity": False}
CHUNK_SIZE = 64  # 2 CPU cores, D=64, T=16K: 64 and 128 tie (128 blocks of chunks); 32 and 256 are slower
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


# -- shared pieces ---------------------------------------------------------------------------------


def features(q: Tensor, k: Tensor, scale, feature_map: str) -> linear_chunks.Features:
    """The feature maps of a call (also used by context parallelism, attnlab.distributed.linear)."""
    return linear_chunks.Features(
        FEATURE_MAPS[feature_map],
        resolve_scale(scale, q.shape[-1]),
        q.shape[1] // k.shape[1],
        compute_dtype(q.dtype),
        NORMALIZED[feature_map],
    )


def _log_decay(decay: Tensor | None, dtype: torch.dtype, device) -> Tensor | None:
    return None if decay is None else torch.log(decay.to(device=device, dtype=dtype))


# -- the three forms, for any feature map and an optional per-head decay [H] -----------------------


def chunked(q, k, v, *, causal=False, scale=None, feature_map="elu+1", decay=None, chunk_size=CHUNK_SIZE) -> Tensor:
    """The fast path: q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> [B,H,T,Dv]. ``decay`` [H] in
    (0, 1) or None. Memory linear in T and S (see kernels/linear_chunks.py)."""
    sh = check_qkv(q, k, v)
    feats = features(q, k, scale, feature_map)
    log_g = _log_decay(decay, feats.dtype, q.device)
    # One cast up front: the passes' gradients then add in the compute dtype and round to q.dtype
    # once (per-slice casts would round each pass's bf16 gradient, and passes can cancel).
    out_dtype, (q, k, v) = q.dtype, (t.to(feats.dtype) for t in (q, k, v))
    if causal:
        return linear_chunks.causal(q, k, v, feats, log_g, sh.S - sh.T, chunk_size, finish=True)[0].to(out_dtype)
    return linear_chunks.noncausal(q, k, v, feats, log_g, chunk_size).to(out_dtype)


def parallel(q, k, v, *, causal=False, scale=None, feature_map="elu+1", decay=None) -> _reference.Reference:
    """The oracle: materializes the [B,H,T,S] coefficients. Returns (out, weights, lse=None), where
    weights are the normalized coefficients (the raw ones for identity features)."""
    sh = check_qkv(q, k, v)
    feats = features(q, k, scale, feature_map)
    qf, (kf, vf) = feats.q(q, 0, sh.T), feats.kv(k, v, 0, sh.S)
    pos = torch.arange(sh.T, device=q.device) + sh.S - sh.T
    dist = pos.view(-1, 1) - torch.arange(sh.S, device=q.device).view(1, -1)  # p_t - j  [T, S]
    coef = torch.ones(1, sh.T, sh.S, dtype=qf.dtype, device=q.device)
    if decay is not None:
        coef = torch.exp(_log_decay(decay, qf.dtype, q.device).view(-1, 1, 1) * dist.abs())  # [H, T, S]
    if causal:
        coef = coef * (dist >= 0)
    w = (qf @ kf.transpose(-1, -2)) * coef  # [B, H, T, S]
    if NORMALIZED[feature_map]:
        w = w / w.sum(-1, keepdim=True).clamp_min(EPS)
    return _reference.Reference((w @ vf).to(q.dtype), w, None)


def _check_state(state: LinearState | None, shapes, feats: linear_chunks.Features, device):
    """The public state, validated, in the compute dtype."""
    if state is None:
        return None
    B, H, D, Dv = shapes.B, shapes.H, shapes.D, shapes.Dv
    if not isinstance(state, LinearState):
        raise TypeError(f"state must be a LinearState or None, got {type(state).__name__}")
    if tuple(state.kv.shape) != (B, H, D, Dv):
        raise ValueError(f"state.kv must be [B, H, D, Dv] = {[B, H, D, Dv]}, got {list(state.kv.shape)}")
    if feats.normalized != (state.z is not None):
        raise ValueError(f"this feature map's state needs {'a z [B, H, D]' if feats.normalized else 'z=None'}")
    if state.z is not None and tuple(state.z.shape) != (B, H, D):
        raise ValueError(f"state.z must be [B, H, D] = {[B, H, D]}, got {list(state.z.shape)}")
    return tuple(None if s is None else s.to(device=device, dtype=feats.dtype) for s in state)


def recurrent_form(
    q, k, v, state=None, *, scale=None, feature_map="elu+1", decay=None, chunk_size=CHUNK_SIZE
) -> RecurrentOutput:
    """New tokens (q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], causal among themselves) after the
    tokens summarized by ``state`` (None = nothing before). Returns (output [B,H,T,Dv], state)."""
    sh = check_qkv(q, k, v)
    if sh.T != sh.S:
        raise ValueError(f"the recurrent form takes the same new tokens as queries and keys: T={sh.T} != S={sh.S}")
    feats = features(q, k, scale, feature_map)
    state = _check_state(state, sh, feats, q.device)
    log_g = _log_decay(decay, feats.dtype, q.device)
    out, _, new = linear_chunks.aligned(q, k, v, feats, log_g, chunk_size, state, finish=True)
    return RecurrentOutput(out, LinearState(*new))


# -- the registered mechanism: no decay ------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, feature_map="elu+1", chunk_size=CHUNK_SIZE) -> AttentionOutput:
    out = chunked(q, k, v, causal=causal, scale=scale, feature_map=feature_map, chunk_size=chunk_size)
    return AttentionOutput(out, None)


def fla_supports(q, k, v, causal, need_lse=False, **options) -> str | None:
    """None when fla's kernels can run the call (kernels/fla.py), else why not."""
    return _fla.supports(q, k, v, causal)


def fla_chunked(q, k, v, *, causal, scale=None, feature_map="elu+1", decay=None) -> Tensor:
    """The chunked form on fla's kernels (causal; ``decay`` [H] or None). q [B,H,T,D], k [B,Hkv,S,D],
    v [B,Hkv,S,Dv] -> [B,H,T,Dv] in q.dtype."""
    check_qkv(q, k, v)
    reason = _fla.supports(q, k, v, causal)
    if reason is not None:
        raise ValueError(f"fla cannot run this call: {reason}")
    feats = features(q, k, scale, feature_map)
    log_g = _log_decay(decay, torch.float32, q.device)
    return _fla.causal(q, k, v, feats, log_g, identity=feature_map == "identity")


def fla(q, k, v, *, causal=False, scale=None, feature_map="elu+1", chunk_size=CHUNK_SIZE) -> AttentionOutput:
    """The ``fla`` impl (fla's chunk size is its own: ``chunk_size`` tunes the torch path only)."""
    return AttentionOutput(fla_chunked(q, k, v, causal=causal, scale=scale, feature_map=feature_map), None)


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


__all__ = [
    "LinearState",
    "RecurrentOutput",
    "attention",
    "chunked",
    "fla",
    "fla_chunked",
    "fla_supports",
    "oracle",
    "parallel",
    "recurrent",
]


SPEC = Mechanism(
    "linear",
    "Transformers are RNNs (Katharopoulos et al.), arXiv 2006.16236",
    Kind.LINEAR,
    {"fla": Impl(fla, fla_supports), "chunked": Impl(attention)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="no softmax: rows are normalized by a sum of feature-map products (identity maps: none)",
    drop_in=False,
    example=lambda S: {"chunk_size": 8},
    oracle=oracle,
)

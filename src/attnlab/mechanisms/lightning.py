"""Lightning attention: linear attention with a fixed per-head decay, as the Lightning layers of
MiniCPM-SALA (arXiv 2602.11761) and HypeNet (arXiv 2601.22156) use it; the chunked "lightning"
computation is Lightning Attention-2 (Qin et al., arXiv 2401.04658). Spec §7.2::

    S_t = gamma_h * S_{t-1} + k_t^T v_t          (S_{-1} = 0; state [D, Dv] per query head)
    o_t = scale * q_t S_t                          (the current token included; no normalizer)
    parallel form:  O = ((Q K^T * scale) * M) V,   M[t, j] = gamma_h ** (t - j) * [j <= t]

This is ``linear`` with identity features (unnormalized, see linear.py) and a decay; the three
forms (parallel oracle, chunked fast path, recurrent decoding) are linear.py's, with the decay.

* ``decay``: None (default) takes SALA's fixed ``gamma_h = exp(-s_h)`` with ``s_h`` the ALiBi
  slope of head h (``2 ** (-8 (h+1) / H)`` for H a power of two, ALiBi's interleaved extension
  otherwise); a float gives every head that decay; a sequence or 1-D tensor gives one per query
  head. Each value must lie in (0, 1): gamma = 1 is ``linear`` with identity features, gamma = 0
  would forget everything but the current token. It is fixed, not learned (no gradient).
* The per-layer slope factor of MiniMax-01 is not applied (HypeNet/SALA have none, spec §7.2); pass
  your own ``decay`` for it. qk-norm, RoPE, the output RMSNorm and gate belong to the layer.
* Non-causal calls decay symmetrically, ``gamma ** |p_t - j|`` (see linear.py); cross calls use
  the bottom-right positions ``p_t = t + S - T``.
* On CUDA, causal calls run flash-linear-attention's ``chunk_simple_gla`` with
  ``g_gamma = log(gamma_h)`` (the ``fla`` impl, kernels/fla.py); elsewhere the torch chunked path.
* No log-sum-exp (``has_lse=False``; ``attention_lse`` refuses it): no softmax and no normalizer,
  so partial results over key shards simply add.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, positive_int
from attnlab.mechanisms import linear
from attnlab.spec import Impl, Kind, Mechanism

DEFAULTS = {"decay": None, "chunk_size": linear.CHUNK_SIZE}


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al., arXiv 2108.12409), including its non-power-of-two rule."""

    def power_of_two(n: int) -> list[float]:
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]

    n = 2 ** int(math.log2(heads))
    return power_of_two(n) + power_of_two(2 * n)[0::2][: heads - n]


def default_decay(heads: int) -> tuple[float, ...]:
    """SALA's fixed decays: gamma_h = exp(-slope_h)."""
    return tuple(math.exp(-s) for s in alibi_slopes(heads))


def check_decay(value: object) -> float | tuple[float, ...] | None:
    """None, a float in (0, 1), or a 1-D sequence/tensor of them (one per query head)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"decay must be a float or a 1-D tensor of per-head decays, got {tuple(value.shape)}")
        vals = tuple(float(x) for x in value.detach().cpu().tolist())
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise ValueError(f"decay must be a float or a sequence of per-head floats, got {value!r}")
        vals = tuple(float(x) for x in value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = (float(value),)
    else:
        raise ValueError(f"decay must be None, a float in (0, 1) or one per head, got {value!r}")
    if not vals or not all(0.0 < x < 1.0 for x in vals):  # also refuses NaN
        raise ValueError(f"decay must lie in (0, 1) (exclusive), got {value!r}")
    return vals if isinstance(value, (Tensor, list, tuple)) else vals[0]


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    return {"decay": check_decay(opts["decay"]), "chunk_size": positive_int("chunk_size", opts["chunk_size"])}


def decay_tensor(decay, heads: int, device=None) -> Tensor:
    """The validated option -> fp64 [H] on ``device`` (cast to the compute dtype later)."""
    if decay is None:
        vals = default_decay(heads)
    elif isinstance(decay, float):
        vals = (decay,) * heads
    else:
        vals = decay
        if len(vals) != heads:
            raise ValueError(f"decay must have one value per query head (H={heads}), got {len(vals)}")
    return torch.tensor(vals, dtype=torch.float64, device=device)


def attention(q, k, v, *, causal=False, scale=None, decay=None, chunk_size=linear.CHUNK_SIZE) -> AttentionOutput:
    g = decay_tensor(decay, q.shape[1], q.device)
    out = linear.chunked(q, k, v, causal=causal, scale=scale, feature_map="identity", decay=g, chunk_size=chunk_size)
    return AttentionOutput(out, None)


def fla(q, k, v, *, causal=False, scale=None, decay=None, chunk_size=linear.CHUNK_SIZE) -> AttentionOutput:
    """The ``fla`` impl: fla's ``chunk_simple_gla`` with per-head log decays (causal, CUDA)."""
    g = decay_tensor(decay, q.shape[1], q.device)
    out = linear.fla_chunked(q, k, v, causal=causal, scale=scale, feature_map="identity", decay=g)
    return AttentionOutput(out, None)


def oracle(q, k, v, *, causal=False, scale=None, decay=None, chunk_size=linear.CHUNK_SIZE) -> _reference.Reference:
    g = decay_tensor(decay, q.shape[1], q.device)
    return linear.parallel(q, k, v, causal=causal, scale=scale, feature_map="identity", decay=g)


def recurrent(q, k, v, state=None, *, scale=None, decay=None, chunk_size=linear.CHUNK_SIZE) -> linear.RecurrentOutput:
    """Decoding with the decayed state: tokens one at a time (T = 1) or a chunk at a time.
    q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], state a ``linear.LinearState`` (z is None) or None."""
    g = decay_tensor(check_decay(decay), check_qkv(q, k, v).H, q.device)
    positive_int("chunk_size", chunk_size)
    return linear.recurrent_form(q, k, v, state, scale=scale, feature_map="identity", decay=g, chunk_size=chunk_size)


SPEC = Mechanism(
    "lightning",
    "Lightning Attention-2, arXiv 2401.04658; as in MiniCPM-SALA, arXiv 2602.11761",
    Kind.LINEAR,
    {"fla": Impl(fla, linear.fla_supports), "chunked": Impl(attention)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="no softmax: decayed linear attention with no normalizer at all (spec §7.2)",
    drop_in=False,
    example=lambda S: {"chunk_size": 8},
    oracle=oracle,
)

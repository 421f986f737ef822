"""The calling contract shared by every mechanism.

Notation (used in every docstring and shape comment of the library)::

    B batch · H query heads · Hkv key/value heads (H % Hkv == 0) · T query length · S key length
    D head dim · Dv value head dim
    q [B, H, T, D]   k [B, Hkv, S, D]   v [B, Hkv, S, Dv]   ->   out [B, H, T, Dv]

Causal alignment is bottom-right: query row ``i`` sits at key position ``i + (S - T)``, the
KV-cache convention. A query row with no allowed key outputs 0 and has LSE ``-inf``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Shapes(NamedTuple):
    B: int
    H: int
    Hkv: int
    T: int
    S: int
    D: int
    Dv: int

    @property
    def groups(self) -> int:
        """Query heads per kv head."""
        return self.H // self.Hkv


class AttentionOutput(NamedTuple):
    """``out [B, H, T, Dv]`` in q's dtype and ``lse [B, H, T]`` in at least fp32 (``-inf`` = no key).

    From ``attnlab.attention_lse`` the LSE is always a tensor: the log-sum-exp of the mechanism's
    softmax, by which partial results over disjoint key sets merge exactly (:func:`merge_lse`).
    Mechanisms whose record says ``has_lse=False`` (no softmax, or several combined) are refused
    there with the record's ``no_lse`` reason. Inside, an impl of such a mechanism returns
    ``lse=None``, and so may a fast path that refuses ``need_lse`` in its ``supports`` (public SDPA
    off the CPU); ``attention`` reads only ``out``.
    """

    out: Tensor
    lse: Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> Shapes:
    """Validate the SDPA layout and return the named sizes. Raises ValueError/TypeError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, length, dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"k head dim must equal q head dim {D}, got {Dk}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"v must be [B, Hkv={Hkv}, S={S}, Dv], got shape {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv} (GQA)")
    if min(B, H, D, v.shape[3]) == 0:
        raise ValueError(f"q, k, v need non-empty batch, head and dim sizes, got {tuple(q.shape)}")
    return Shapes(B, H, Hkv, T, S, D, v.shape[3])


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """``None`` means ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def check_causal(causal: object) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, S, E] -> [B, Hkv*groups, S, E]: query head i reads kv head i // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """References and LSEs use at least fp32, and fp64 when given fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> AttentionOutput:
    """Exactly merge two softmax attentions over disjoint key sets.

    out_* [..., T, Dv], lse_* [..., T]. A side whose LSE is ``-inf`` (no keys) contributes nothing;
    if both are ``-inf`` the merged row is 0 with LSE ``-inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) would be NaN: empty merged rows get weight 0 on both sides instead.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = (out_a.to(w_a.dtype) * w_a + out_b.to(w_b.dtype) * w_b).to(out_a.dtype)
    return AttentionOutput(out, lse)


# -- option validation helpers: every message names the option and what was expected -------------


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def nonnegative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def int_tuple(name: str, value: object, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """An int (broadcast to ``ndim`` axes) or a tuple of ``ndim`` ints, each >= minimum."""
    vals = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, (tuple, list)) or len(vals) != ndim:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            raise ValueError(f"{name} entries must be ints >= {minimum}, got {value!r}")
    return tuple(vals)


def equal_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-pad q/k or v to one head width, for fused kernels that need D == Dv.

    Exact: zero columns leave q.k unchanged, and extra output columns are sliced off by the caller.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    if D < Dv:
        return torch.nn.functional.pad(q, (0, Dv - D)), torch.nn.functional.pad(k, (0, Dv - D)), v
    if Dv < D:
        return q, k, torch.nn.functional.pad(v, (0, D - Dv))
    return q, k, v


def near_square(n: int) -> tuple[int, int]:
    """The most square factorization ``(a, b)`` of n, a <= b: the 2-D grid a flat sequence of n
    tokens stands for in examples and workloads."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a

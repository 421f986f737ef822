"""The dense oracle: softmax attention under an explicit boolean mask.

It materializes the full ``[B, H, T, S]`` weights on purpose. It is the ground truth every fast
path is compared against, so it is written for clarity, computes in fp32 (fp64 when given fp64),
and never shares code with the fast paths beyond argument checking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from attnlab.core import check_qkv, compute_dtype, repeat_kv, resolve_scale


class Reference(NamedTuple):
    out: Tensor  # [B, H, T, Dv] in q.dtype
    weights: Tensor  # [B, H, T, S] in the compute dtype; rows with no allowed key are 0
    lse: Tensor  # [B, H, T] in the compute dtype; -inf for rows with no allowed key


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right causal mask [T, S]: query i sees keys j <= i + (S - T)."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - T)


def query_head_mask(mask: Tensor, heads: int) -> Tensor:
    """A mechanism's mask [B|1, Hkv|1, T, S] -> [B|1, H|1, T, S] for ``heads`` query heads.

    With grouped-query attention the query heads of a group share their kv head's pattern: query
    head i uses kv head i // (H // Hkv), the order ``repeat_kv`` expands k and v in.
    """
    if mask.dim() != 4:
        raise ValueError(f"mask must be [B|1, Hkv|1, T, S], got shape {tuple(mask.shape)}")
    kv_heads = mask.shape[1]
    if kv_heads in (1, heads):
        return mask
    if heads % kv_heads:
        raise ValueError(f"mask has {kv_heads} kv heads, which must divide the {heads} query heads")
    return mask.repeat_interleave(heads // kv_heads, dim=1)


def _broadcast_mask(mask: Tensor, B: int, H: int, T: int, S: int) -> Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = allowed), got {mask.dtype}")
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (T, S):
        raise ValueError(f"mask must be [T, S], [H, T, S] or [B, H, T, S] with T={T}, S={S}, got {tuple(mask.shape)}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if mask.dim() == 2:
        mask = mask.view(1, 1, T, S)
    if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H):
        raise ValueError(f"mask batch/head dims must be 1 or B={B}/H={H}, got {tuple(mask.shape)}")
    return mask


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, causal: bool = False, scale: float | None = None
) -> Reference:
    """Dense masked softmax attention. ``mask`` is bool [T, S], [H, T, S] or [B|1, H|1, T, S] (a
    mechanism's [B|1, Hkv|1, T, S] mask goes through ``query_head_mask`` first); ``causal`` is ANDed
    with it (bottom-right aligned)."""
    B, H, Hkv, T, S, D, _ = check_qkv(q, k, v)
    scale = resolve_scale(scale, D)
    ct = compute_dtype(q.dtype)
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & _broadcast_mask(mask.to(q.device), B, H, T, S)
    if causal:
        allowed = allowed & causal_mask(T, S, q.device)
    kf = repeat_kv(k.to(ct), H // Hkv)
    vf = repeat_kv(v.to(ct), H // Hkv)
    logits = torch.einsum("bhtd,bhsd->bhts", q.to(ct), kf) * scale  # [B, H, T, S]
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, T]; -inf where a row has no key
    empty = torch.isneginf(lse).unsqueeze(-1)
    # Subtract a finite stand-in for empty rows so no NaN appears, then zero them explicitly.
    weights = torch.exp(logits - torch.where(empty, 0.0, lse.unsqueeze(-1)))
    weights = torch.where(empty | ~allowed, torch.zeros_like(weights), weights)
    bad_v = ~torch.isfinite(vf)  # [B, H, S, Dv]
    poisoned = bool(bad_v.any())
    if poisoned:
        # A non-finite value reaches only the rows that allow its key: 0 * NaN would spread it to all.
        seen = torch.einsum("bhts,bhsd->bhtd", allowed.expand(B, H, T, S).to(ct), bad_v.to(ct)) > 0
        vf = vf.masked_fill(bad_v, 0)
    out = torch.einsum("bhts,bhsd->bhtd", weights, vf)
    if poisoned:
        out = out + torch.where(seen, float("nan"), 0.0).to(ct)
    return Reference(out.to(q.dtype), weights, lse)

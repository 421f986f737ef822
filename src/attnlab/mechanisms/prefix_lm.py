"""Prefix-LM attention: bidirectional over a prefix, causal after it (Raffel et al., T5,
arXiv 1910.10683; Dong et al., UniLM, arXiv 1905.03197).

Key j is visible to query row i (key position p = i + S - T) when j < prefix or j <= p. The mask
is causal by definition, so ``causal=False`` is refused rather than silently ignored.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnlab.core import AttentionOutput, nonnegative_int
from attnlab.kernels import block_sizes, block_sparse_attention, build_layout
from attnlab.kernels.layout import query_positions
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"prefix": 0}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    if not causal:
        raise ValueError("prefix_lm is causal after its prefix by definition; call it with causal=True")
    prefix = nonnegative_int("prefix", opts["prefix"])
    if prefix > S:
        raise ValueError(f"prefix must be <= the key length S={S}, got {prefix}")
    return {"prefix": prefix}


def mask(T: int, S: int, *, causal: bool = True, prefix: int = 0) -> Tensor:
    """bool [T, S]."""
    p = torch.arange(T).unsqueeze(1) + (S - T)  # host: dense oracle mask
    j = torch.arange(S).unsqueeze(0)  # host: dense oracle mask
    return (j < prefix) | (j <= p)


def _mask_mod(offset: int, prefix: int):
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx <= q_idx + offset)

    return prefix_lm


@functools.lru_cache(maxsize=64)
def layout(T: int, S: int, prefix: int, block: tuple[int, int]):
    _, last = query_positions(T, S, block[0])
    hi = torch.clamp(last + 1, min=prefix)
    return build_layout(_mask_mod(S - T, prefix), T, S, key_ranges=[(torch.zeros_like(hi), hi)], block=block)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, prefix: int = 0
) -> AttentionOutput:
    return block_sparse_attention(q, k, v, layout(q.shape[2], k.shape[2], prefix, block_sizes(q.device)), scale=scale)


def block_layout(T: int, S: int, *, causal: bool = True, prefix: int = 0):
    return layout(T, S, prefix, block_sizes())


SPEC = Mechanism(
    "prefix_lm",
    "T5, arXiv 1910.10683; UniLM, arXiv 1905.03197",
    Kind.MASK,
    {"blocksparse": Impl(attention)},
    check_options,
    DEFAULTS,
    patterns=frozenset({"self_causal", "cross_causal"}),
    example=lambda S: {"prefix": S // 3},
    workloads=Workloads(efficiency=lambda T: {"prefix": T // 4}, quality=lambda L: {"prefix": L // 4}),
    mask=mask,
    layout=block_layout,
)

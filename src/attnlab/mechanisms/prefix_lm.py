"""Prefix-LM attention: bidirectional over a prefix, causal after it (Raffel et al., T5,
arXiv 1910.10683; Dong et al., UniLM, arXiv 1905.03197).

Key j is visible to query row i (key position p = i + S - T) when j < prefix or j <= p. The mask
is causal by definition, so ``causal=False`` is refused rather than silently ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.core import nonnegative_int
from attnlab.kernels import build_layout
from attnlab.kernels.layout import cached_layout, query_positions
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"prefix": 0}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    if not causal:
        raise ValueError("prefix_lm is causal after its prefix by definition; call it with causal=True")
    prefix = nonnegative_int("prefix", opts["prefix"])
    if prefix > S:
        raise ValueError(f"prefix must be <= the key length S={S}, got {prefix}")
    return {"prefix": prefix}


def mask(T: int, S: int, *, causal: bool, prefix: int) -> Tensor:
    """bool [T, S]."""
    p = torch.arange(T).unsqueeze(1) + (S - T)  # host: dense oracle mask
    j = torch.arange(S).unsqueeze(0)  # host: dense oracle mask
    return (j < prefix) | (j <= p)


def _mask_mod(offset: int, prefix: int):
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx <= q_idx + offset)

    return prefix_lm


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], prefix: int):
    _, last = query_positions(T, S, block[0])
    hi = torch.clamp(last + 1, min=prefix)
    return build_layout(_mask_mod(S - T, prefix), T, S, key_ranges=[(torch.zeros_like(hi), hi)], block=block)


SPEC = Mechanism(
    "prefix_lm",
    "T5, arXiv 1910.10683; UniLM, arXiv 1905.03197",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    patterns=frozenset({"self_causal", "cross_causal"}),
    example=lambda S: {"prefix": S // 3},
    workloads=Workloads(efficiency=lambda T: {"prefix": T // 4}, quality=lambda L: {"prefix": L // 4}),
    mask=mask,
    layout=layout,
)

"""Sliding-window (local band) attention: Longformer (Beltagy et al., arXiv 2004.05150) and
Mistral 7B (Jiang et al., arXiv 2310.06825).

Query row i sits at key position p = i + S - T (bottom-right). Causal: keys (p - window, p].
Non-causal: keys with |p - j| <= window // 2. The window shrinks at the sequence edges.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnlab.core import AttentionOutput, positive_int
from attnlab.kernels import block_sizes, block_sparse_attention, build_layout
from attnlab.kernels.layout import query_positions
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"window": 512}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    return {"window": positive_int("window", opts["window"])}


def mask(T: int, S: int, *, causal: bool = False, window: int = 512) -> Tensor:
    """bool [T, S], written straight from the definition."""
    p = torch.arange(T).unsqueeze(1) + (S - T)  # host: dense oracle mask
    j = torch.arange(S).unsqueeze(0)  # host: dense oracle mask
    if causal:
        return (j <= p) & (j > p - window)
    return (p - j).abs() <= window // 2


def _mask_mod(offset: int, causal: bool, window: int):
    half = window // 2

    def sliding_window(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx  # how far the key lies behind the query
        return ((d >= 0) & (d < window)) if causal else ((d <= half) & (d >= -half))

    return sliding_window


@functools.lru_cache(maxsize=64)
def layout(T: int, S: int, causal: bool, window: int, block: tuple[int, int]):
    first, last = query_positions(T, S, block[0])
    lo = first - (window - 1 if causal else window // 2)
    hi = last + 1 + (0 if causal else window // 2)
    return build_layout(_mask_mod(S - T, causal, window), T, S, key_ranges=[(lo, hi)], block=block)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, window: int = 512
) -> AttentionOutput:
    lay = layout(q.shape[2], k.shape[2], causal, window, block_sizes(q.device))
    return block_sparse_attention(q, k, v, lay, scale=scale)


def block_layout(T: int, S: int, *, causal: bool = False, window: int = 512):
    return layout(T, S, causal, window, block_sizes())


SPEC = Mechanism(
    "sliding_window",
    "Longformer, arXiv 2004.05150; Mistral, arXiv 2310.06825",
    Kind.MASK,
    {"blocksparse": Impl(attention)},
    check_options,
    DEFAULTS,
    example=lambda S: {"window": 5},
    workloads=Workloads(quality=lambda L: {"window": L // 4}, reach="window"),
    mask=mask,
    layout=block_layout,
)

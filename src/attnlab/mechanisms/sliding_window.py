"""Sliding-window (local band) attention: Longformer (Beltagy et al., arXiv 2004.05150) and
Mistral 7B (Jiang et al., arXiv 2310.06825).

Query row i sits at key position p = i + S - T (bottom-right). Causal: keys (p - window, p].
Non-causal: keys with |p - j| <= window // 2. The window shrinks at the sequence edges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.core import positive_int
from attnlab.kernels import build_layout
from attnlab.kernels.layout import cached_layout, query_positions
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"window": 512}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    return {"window": positive_int("window", opts["window"])}


def mask(T: int, S: int, *, causal: bool, window: int) -> Tensor:
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


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], window: int):
    first, last = query_positions(T, S, block[0])
    lo = first - (window - 1 if causal else window // 2)
    hi = last + 1 + (0 if causal else window // 2)
    return build_layout(_mask_mod(S - T, causal, window), T, S, key_ranges=[(lo, hi)], block=block)


SPEC = Mechanism(
    "sliding_window",
    "Longformer, arXiv 2004.05150; Mistral, arXiv 2310.06825",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    example=lambda S: {"window": 5},
    workloads=Workloads(quality=lambda L: {"window": L // 4}, reach="window"),
    mask=mask,
    layout=layout,
)

"""Streaming attention with attention sinks: StreamingLLM (Xiao et al., arXiv 2309.17453); also
the sparse branch of Flux Attention (arXiv 2604.07394).

Query row i (key position p = i + S - T) sees the first ``sinks`` keys plus a sliding window:
causal (p - window, p], non-causal |p - j| <= window // 2. Causal sinks are still causal: a query
never sees a sink that lies after it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.core import nonnegative_int, positive_int
from attnlab.kernels import build_layout
from attnlab.kernels.layout import cached_layout, query_positions
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"sinks": 4, "window": 512}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    return {"sinks": nonnegative_int("sinks", opts["sinks"]), "window": positive_int("window", opts["window"])}


def mask(T: int, S: int, *, causal: bool, sinks: int, window: int) -> Tensor:
    """bool [T, S]."""
    p = torch.arange(T).unsqueeze(1) + (S - T)  # host: dense oracle mask
    j = torch.arange(S).unsqueeze(0)  # host: dense oracle mask
    if causal:
        return (j <= p) & ((j < sinks) | (j > p - window))
    return (j < sinks) | ((p - j).abs() <= window // 2)


def _mask_mod(offset: int, causal: bool, sinks: int, window: int):
    half = window // 2

    def streaming(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        if causal:
            return (d >= 0) & ((kv_idx < sinks) | (d < window))
        return (kv_idx < sinks) | ((d <= half) & (d >= -half))

    return streaming


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], sinks: int, window: int):
    first, last = query_positions(T, S, block[0])
    lo = first - (window - 1 if causal else window // 2)
    hi = last + 1 + (0 if causal else window // 2)
    sink_hi = torch.clamp(torch.full_like(last, sinks), max=last + 1) if causal else torch.full_like(last, sinks)
    ranges = [(torch.zeros_like(lo), sink_hi), (lo, hi)]
    return build_layout(_mask_mod(S - T, causal, sinks, window), T, S, key_ranges=ranges, block=block)


SPEC = Mechanism(
    "streaming",
    "StreamingLLM, arXiv 2309.17453",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    example=lambda S: {"sinks": 2, "window": 4},
    workloads=Workloads(
        efficiency=lambda T: {"sinks": 64, "window": 512},
        quality=lambda L: {"sinks": 4, "window": L // 4},
        reach="window",
    ),
    mask=mask,
    layout=layout,
)

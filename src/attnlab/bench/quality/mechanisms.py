"""Which mechanisms the quality suite trains, and with which options at a sequence length L.

Windowed patterns get a window of L/4 (T3 sweeps L/8, L/4, L/2: 16/32/64 at L=128, the spec's
reach ladder). Block-structured ones get blocks of L/16. A mechanism registered later with no entry
here runs with its registry defaults (or, when those do not fit a length-L causal self attention,
its registry ``example(L)``), so new mechanisms are picked up without editing this file; one that
cannot run at all is skipped with the reason in the report.
"""

from __future__ import annotations

import torch

from attnlab import registry
from attnlab.bench.quality.model import RecallModel

# Options per mechanism at length L (registry defaults fill the rest).
OPTIONS = {
    "sliding_window": lambda L: {"window": L // 4},
    "streaming": lambda L: {"sinks": 4, "window": L // 4},
    "neighborhood": lambda L: {"shape": (L,), "kernel_size": L // 4},
    "prefix_lm": lambda L: {"prefix": L // 4},
    "strided_shard": lambda L: {"block_size": max(1, L // 16), "local_blocks": 2, "vert_stride": 4},
    "block_topk": lambda L: {"block_size": max(1, L // 16), "top_k": 3, "init_blocks": 1, "local_blocks": 1},
    "global_local": lambda L: {"window": L // 4, "pool": 8},
    "multiscale": lambda L: {"window": L // 8, "pools": (4, 16)},
    "dynamic_hierarchical": lambda L: {
        "chunking": "fixed",
        "chunk_size": max(1, L // 16),
        "budget": L // 4,
        "local": L // 8,
        "sinks": 4,
    },
}
# The option T3 (reach) sweeps, for mechanisms that have one.
REACH_OPTION = {"neighborhood": "kernel_size"}
# Mechanisms that need several heads use H heads of d/H each (spec §5.2: state and parameters match).
HEADS = {"differential": 4, "moh": 4}
# Registered, but not a causal token mixer over one unpacked sequence.
SKIP = {
    "halo": "serves non-causal self attention over a 2-D grid only",
    "region": "needs per-token layout groups (layout-to-image control)",
    "document": "a packing mask: on one unpacked sequence it is dense attention",
    "moh": "routed heads need nn.MoHAttention's gate network; the bare mechanism takes fixed gates",
}
QUICK = ("dense", "sliding_window", "linear")


def reach_option(name: str) -> str | None:
    opt = REACH_OPTION.get(name, "window")
    return opt if opt in registry.get(name).defaults else None


def options_at(name: str, seq_len: int, reach: int | None = None) -> dict:
    opts = OPTIONS[name](seq_len) if name in OPTIONS else {}
    if reach is not None:
        opts[reach_option(name)] = reach
    return opts


def _runs(name: str, seq_len: int, opts: dict, dim: int) -> str | None:
    """None when the model builds and runs a forward and backward at this length, else why not."""
    try:
        model = RecallModel(16, name, opts, dim=dim, heads=HEADS.get(name, 1))
        x = torch.randint(0, 16, (1, seq_len))
        model(x, torch.ones(1, seq_len, dtype=torch.bool)).logits.sum().backward()
        return None
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def resolve(name: str, seq_len: int, dim: int, reach: int | None = None) -> tuple[dict | None, str | None]:
    """(options, None) for a runnable configuration, or (None, the reason to skip)."""
    if name in SKIP:
        return None, SKIP[name]
    opts = options_at(name, seq_len, reach)
    why = _runs(name, seq_len, opts, dim)
    if why is None:
        return opts, None
    if name not in OPTIONS and reach is None:
        example = registry.get(name).example(seq_len)
        if _runs(name, seq_len, example, dim) is None:
            return example, None
    return None, why


def select(requested: list[str] | None, preset: str) -> tuple[list[str], list[str]]:
    """(mechanisms to run, notes): the requested ones, else the preset's; unregistered names in a
    preset are skipped with a note (``linear`` joins the quick preset once it is registered)."""
    known = registry.mechanisms()
    if requested:
        return list(dict.fromkeys(requested)), []
    wanted = list(QUICK) if preset == "quick" else known
    notes = [f"{n}: not registered in this build; skipped" for n in wanted if n not in known]
    return [n for n in wanted if n in known], notes

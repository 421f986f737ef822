"""What the efficiency benchmark runs: each mechanism's workload at a length (read from its record),
which mechanism *is* the SDPA baseline (from its record too), and the mask patterns of the
Long-Context Attention benchmarks (LongCA-bench; CAB, Zhang et al., ICML 2023) on our mechanisms, so
one sweep times each pattern on the executor against SDPA and Flex. The bottom floor of the
benchmark: it reads the registry and nothing of ``bench``.

Each pattern is (mechanism, options at length T, causal), a user-facing catalogue entry:

* full, causal: dense attention.
* sliding_window (causal and not): a 512-key window.
* global_sliding: 64 global (sink) keys every query sees, plus a 512-key causal window.
* document: packed documents with a log-normal length mix around T/8, causal within each.
* shared_question: documents that each see only themselves, then a question (the last T/8 tokens)
  that sees every document (region rules), causal.
* prefix_lm: a bidirectional prefix of T/4, causal after it.
* block_causal: blocks of T/8 tokens, bidirectional inside a block, every earlier block visible.
"""

from __future__ import annotations

import torch

from attnlab import registry
from attnlab.mechanisms.document import packed_lengths
from attnlab.spec import Kind, Mechanism


def bench_options(name: str, T: int) -> dict:
    """The configuration each mechanism is benchmarked with at length T: its record's efficiency
    workload, else its defaults (which make sense at any length)."""
    mech = registry.get(name)
    at = mech.workloads.efficiency
    return dict(mech.defaults) if at is None else at(T)


def is_sdpa_baseline(mech: Mechanism) -> bool:
    """Whether the mechanism's fast path *is* the SDPA baseline: one softmax under a fixed mask whose
    first (fastest) impl is named ``sdpa``. Timing it against SDPA times SDPA against itself, its
    block layout never runs, and Flex times its mask only as a pattern of the sweep. (A composite
    whose impl calls SDPA, gates on top, is not the baseline: it computes something else.)"""
    return mech.kind is Kind.MASK and next(iter(mech.impls), None) == "sdpa"


def _shared_question(T: int) -> dict:
    question = max(1, T // 8)
    docs = packed_lengths(T - question)
    groups = torch.cat(
        [torch.full((n,), i + 1) for i, n in enumerate(docs)] + [torch.zeros(question, dtype=torch.long)]
    )
    rules = torch.eye(len(docs) + 1, dtype=torch.bool)
    rules[0] = True  # the question (group 0) reads every document
    return {"groups": groups, "rules": rules}


def _block_causal(T: int) -> dict:
    block = max(1, T // 8)
    groups = torch.arange(T) // block
    n = int(groups.max()) + 1
    return {"groups": groups, "rules": torch.ones(n, n, dtype=torch.bool).tril()}


PATTERNS = {
    "full": ("dense", lambda T: {}, False),
    "causal": ("dense", lambda T: {}, True),
    "sliding_window": ("sliding_window", lambda T: {"window": 512}, False),
    "sliding_window_causal": ("sliding_window", lambda T: {"window": 512}, True),
    "global_sliding": ("streaming", lambda T: {"sinks": 64, "window": 512}, True),
    "document": ("document", lambda T: {"lengths": packed_lengths(T)}, True),
    "shared_question": ("region", _shared_question, True),
    "prefix_lm": ("prefix_lm", lambda T: {"prefix": T // 4}, True),
    "block_causal": ("region", _block_causal, False),
}

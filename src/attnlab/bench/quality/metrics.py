"""Metrics: per-example accuracy, accuracy sliced by key-query distance, the reach cap of a static
mask, and the leak flag (spec/quality.md §1.1 item 7, §4 item 1, §5.2, §5.5 rules 4-6).

Reach cap. With one attention layer after a causal conv of width k=3, the answer token at position
p reaches the query's output only through a position whose conv window holds it *and* what
identifies it: p itself (its predecessor, the key, is in the window) and p + 1 (the key and the
answer are both at offsets -2 and -1). So a scored query at q is *reachable* when the mask lets q see
p or p + 1; the cap is the share of reachable queries, per example, averaged over examples (the
accuracy's own averaging). In MQAR values sit at odd positions and queries at even ones, so for an
even window w this is the spec's "distance <= w - 1" rule exactly (§5.2's caps table).
"""

from __future__ import annotations

import torch
from torch import Tensor

LEAK_MARGIN = 0.02  # spec §5.2: above cap + 0.02 the mask leaks


def per_example_mean(values: Tensor, scored: Tensor) -> float:
    """Mean over each example's scored positions, then over examples (Zoology's accuracy).
    values [n, L] (only read where scored), scored bool [n, L]."""
    counts = scored.sum(1)
    keep = counts > 0
    sums = torch.where(scored, values.to(torch.float64), 0.0).sum(1)
    return float((sums[keep] / counts[keep]).mean())


def correct_grid(pred: Tensor, labels: Tensor, scored: Tensor) -> Tensor:
    """Scatter per-position correctness (pred [M], row-major over ``scored``) back to [n, L]."""
    grid = torch.zeros(labels.shape, dtype=torch.bool)
    grid[scored] = pred == labels[scored]
    return grid


def buckets(max_value: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges: 0-1, 1-2, 2-4, 4-8, ... up to max_value (powers of two)."""
    edges, e = [0, 1], 2
    while e <= max_value:
        edges.append(e)
        e *= 2
    edges.append(max_value + 1)
    return list(zip(edges[:-1], edges[1:]))


def sliced(values: Tensor, scored: Tensor, key: Tensor, ranges: list[tuple[int, int]]) -> list[dict]:
    """Mean of ``values`` over the scored positions whose ``key`` is in each [lo, hi) range (pooled
    over positions: a slice mixes examples)."""
    out = []
    for lo, hi in ranges:
        sel = scored & (key >= lo) & (key < hi)
        n = int(sel.sum())
        if n:
            out.append({"lo": lo, "hi": hi, "count": n, "value": float(values[sel].to(torch.float64).mean())})
    return out


def reachable(mask: Tensor, answer: Tensor, scored: Tensor) -> Tensor:
    """bool [n, L]: scored queries whose answer position p (or p + 1, see the module docstring) the
    mask [L, L] lets them see."""
    n, L = answer.shape
    q = torch.arange(L).expand(n, L)
    p = answer.clamp(min=0)
    p1 = (p + 1).clamp(max=L - 1)
    hit = mask[q, p] | ((p + 1 <= q) & mask[q, p1])
    return hit & scored


def reach_cap(mask: Tensor, answer: Tensor, scored: Tensor) -> float:
    """The best accuracy a model confined to ``mask`` can reach on this data, up to chance hits."""
    return per_example_mean(reachable(mask, answer, scored), scored)


def leaks(accuracy: float | None, cap: float | None, margin: float = LEAK_MARGIN) -> bool:
    """True when a result beats its mask's reach cap by more than ``margin``: the mask leaks."""
    return accuracy is not None and cap is not None and accuracy > cap + margin

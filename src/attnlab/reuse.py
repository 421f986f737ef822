"""HyLRA layer reuse (Ai et al., arXiv 2602.00777): profile which layers select the same key blocks,
then let some layers reuse an earlier layer's top-k block selection instead of scoring their own.

Each layer is FULL (a rollback layer: dense), COMPUTE (selects its blocks with a selecting
mechanism, ``block_topk`` in the paper, and becomes the current source) or REUSE (attends over the
current source's blocks; no scoring). Values along a plan: FULL and COMPUTE layers score 1, a
REUSE layer j the overlap T[src, j]. ``plan`` maximizes (min value, then total value)
lexicographically with at most ``max_computes`` FULL + COMPUTE layers (spec §5.2). The bottleneck
(min) objective and the sum do not share optimal substructure, so the plan is exact in two passes:
the best reachable minimum first, then the best sum over plans whose every value reaches it.

Spec ambiguity resolved: rollback layers produce no selection, so they never become a source (the
spec zeroes their overlap rows, which amounts to the same); layer 0, having no source, computes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab import registry

COMPUTE = -1


def shared_selection(
    store: dict, layer, source, mechanism: str, q: Tensor, k: Tensor, *, causal: bool, scale=None, **options
):
    """At run time: a computing layer (``source`` None) selects with ``mechanism`` (any selecting
    one: ``block_topk`` in the paper) and records the selection under ``layer``; a reusing layer
    takes ``store[source]`` without scoring."""
    mech = registry.get(mechanism)
    if not mech.selects:
        raise ValueError(f"layer reuse needs a mechanism that selects its keys; {mechanism} is a {mech.kind.value} one")
    if source is None:
        opts = mech.resolve(q.shape[2], k.shape[2], causal, options)
        store[layer] = mech.select(q, k, causal=causal, scale=scale, **opts)
        return store[layer]
    sel = store.get(source)
    if sel is None or (sel.layout.T, sel.layout.S) != (q.shape[2], k.shape[2]):
        raise ValueError(f"layer {layer} reuses layer {source}, which has no selection for this call")
    return sel


def kept_blocks(selection) -> Tensor:
    """A selection's visited key blocks as bool [Bl, Hl, nQB, nKB], read from its layout (so any
    selecting mechanism's selection profiles the same way): the input of :func:`overlap`."""
    lay = selection.layout
    n_kb = -(-lay.S // lay.block_k)
    slots = lay.kv_blocks  # [Bl, Hl, nQB, V], -1 in unused slots
    kept = torch.zeros(*slots.shape[:3], n_kb + 1, dtype=torch.bool, device=slots.device)
    return kept.scatter_(-1, torch.where(slots < 0, n_kb, slots), True)[..., :n_kb]


def overlap(selections: list[Tensor]) -> Tensor:
    """T[i, j] = mean over (batch, kv head, query block) of |Top_i ∩ Top_j| / |Top_j|, from each
    layer's kept blocks (bool [B, Hkv, nQB, nKB], e.g. :func:`kept_blocks`)."""
    L = len(selections)
    out = torch.eye(L, dtype=torch.float64, device=selections[0].device if L else None)
    for j in range(L):
        size = selections[j].sum(-1).clamp(min=1).double()
        for i in range(j):
            out[i, j] = ((selections[i] & selections[j]).sum(-1) / size).mean()
    return out


def mass_ratio(weights: Tensor, block: int, cover: float = 0.9) -> float:
    """How sparse a layer is: the share of key blocks a query block needs to cover ``cover`` of its
    attention mass, averaged (the profiler's per-layer "hash ratio"). weights [B, H, T, S]."""
    B, H, T, S = weights.shape
    pad = (0, -S % block, 0, -T % block)
    w = torch.nn.functional.pad(weights.double(), pad).sum(1)  # heads summed: [B, T', S']
    blocks = w.unflatten(1, (-1, block)).sum(2).unflatten(2, (-1, block)).sum(3)  # [B, nQB, nKB]
    share = blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-30)
    ranked = share.sort(-1, descending=True).values.cumsum(-1)
    needed = (ranked < cover).sum(-1) + 1  # blocks until the running mass reaches `cover`
    return float((needed.clamp(max=blocks.shape[-1]) / blocks.shape[-1]).mean())


def rollback_layers(ratios: list[float], sparsity: float) -> set[int]:
    """The ⌈L (1 − sparsity)⌉ layers with the densest attention stay FULL."""
    L = len(ratios)
    n = math.ceil(L * (1 - sparsity))
    return set(sorted(range(L), key=lambda i: (-ratios[i], i))[:n])


def plan(T: Tensor, max_computes: int, rollback=()) -> list[int]:
    """Per layer: ``COMPUTE`` (-1, also used for FULL layers) or the source layer it reuses."""
    L = T.shape[0]
    rollback = set(rollback)
    if len(rollback | {0}) > max_computes:
        raise ValueError(f"max_computes={max_computes} is below the layers that must compute ({len(rollback | {0})})")
    levels = sorted({1.0, *[float(x) for x in T[torch.triu_indices(L, L, 1, device=T.device).unbind()]]}, reverse=True)
    for level in levels:  # the best reachable minimum: the highest level with a feasible plan
        best = _best_sum(T, max_computes, rollback, level)
        if best is not None:
            return best
    raise AssertionError("unreachable: computing every allowed layer is always feasible at level 0")


def _best_sum(T: Tensor, max_computes: int, rollback: set, level: float) -> list[int] | None:
    """Max total value over plans whose values all reach ``level``; None if there is none."""
    # state: (current source or None, computes so far) -> (total, plan)
    states: dict = {(None, 0): (0.0, [])}
    for j in range(T.shape[0]):
        nxt: dict = {}
        for (src, c), (total, steps) in states.items():
            moves = [((src, c + 1), 1.0, COMPUTE)] if j in rollback else [((j, c + 1), 1.0, COMPUTE)]
            if j not in rollback and src is not None and float(T[src, j]) >= level:
                moves.append(((src, c), float(T[src, j]), src))
            for key, gain, step in moves:
                if key[1] <= max_computes and (key not in nxt or total + gain > nxt[key][0]):
                    nxt[key] = (total + gain, steps + [step])
        states = nxt
    if not states:
        return None
    return max(states.values(), key=lambda s: s[0])[1]

"""The layer policies the quality suite trains (full preset, or ``--policies``).

A policy model is the suite's model with ``DEPTH`` mixer layers after the conv instead of one
(spec/quality.md §5.2 otherwise unchanged: no MLP, no positions), so each kind of ``attnlab.Policy``
is measured against baselines of the same depth:

* ``dense-x4`` and ``lightning-x4``: the all-softmax and all-linear stacks, the bounds a hybrid sits
  between;
* ``sala``: ``Policy.ratio`` with MiniCPM-SALA's 1 sparse (block_topk) : 3 linear (lightning) ratio
  and its layer placement (with one sparse layer in four, both rules put it last);
* ``flux``: ``Policy.router``, every layer routed per sequence between dense and streaming
  attention (sinks + a window), trained with the router's sparsity loss (target 0.5);
* ``hylra``: ``Policy.reuse``, block_topk computed in layer 0 and its selection reused by the rest.

Sparse options follow the single-mechanism runs at length L (``mechanisms.options_at``).
"""

from __future__ import annotations

from collections.abc import Callable

from attnlab.bench.quality.mechanisms import options_at
from attnlab.policy import Policy

DEPTH = 4


def _sparse(name: str, L: int) -> tuple[str, dict]:
    return name, options_at(name, L)


POLICIES: dict[str, Callable[[int], Policy]] = {
    "dense-x4": lambda L: Policy.explicit(["dense"] * DEPTH),
    "lightning-x4": lambda L: Policy.explicit(["lightning"] * DEPTH),
    "sala": lambda L: Policy.ratio(DEPTH, _sparse("block_topk", L), "lightning", every=4, rule="sala"),
    "flux": lambda L: Policy.router(DEPTH, "dense", _sparse("streaming", L)),
    "hylra": lambda L: Policy.reuse([-1] + [0] * (DEPTH - 1), **options_at("block_topk", L)),
}


def policy_at(name: str, seq_len: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name](seq_len)


def describe(policy: Policy) -> str:
    """One line per policy: the layers' mechanisms, e.g. 'lightning,lightning,lightning,block_topk'."""
    parts = []
    for layer in policy.layers:
        name = layer.mechanism if layer.route is None else f"{layer.mechanism}|{layer.route['mechanism']}"
        parts.append(name if layer.reuse is None else f"{name}<-{layer.reuse}")
    return ",".join(parts)


def select(requested: list[str] | None, preset: str, mechanisms_requested: bool) -> list[str]:
    """The policies to train: the requested ones, else all of them in the full preset unless the
    user picked mechanisms (then only those), none in the quick preset."""
    if requested is not None:
        return list(dict.fromkeys(requested))
    return list(POLICIES) if preset == "full" and not mechanisms_requested else []

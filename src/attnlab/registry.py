"""The explicit list of mechanisms, and the public entry points over it.

Nothing registers itself at import time: ``MECHANISMS`` below is the whole list. The CLI, the
contract tests, the benchmarks and the Hugging Face adapter all iterate it, so a new mechanism is
covered by all of them once it has a record here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab import compile as _compile
from attnlab.core import AttentionOutput, check_qkv, resolve_scale
from attnlab.mechanisms import (
    block_topk,
    dense,
    dha,
    differential,
    document,
    dynamic_hierarchical,
    fixed_pattern,
    global_local,
    halo,
    lightning,
    linear,
    moh,
    multiscale,
    neighborhood,
    prefix_lm,
    region,
    sliding_window,
    span_search,
    streaming,
    strided_shard,
)
from attnlab.spec import ALL_PATTERNS, PATTERNS, Impl, Kind, Mechanism, Workloads

__all__ = ["ALL_PATTERNS", "PATTERNS", "Impl", "Kind", "Mechanism", "Workloads"]

MECHANISMS: list[Mechanism] = [
    dense.SPEC,
    sliding_window.SPEC,
    streaming.SPEC,
    neighborhood.SPEC,
    halo.SPEC,
    document.SPEC,
    prefix_lm.SPEC,
    strided_shard.SPEC,
    block_topk.SPEC,
    region.SPEC,
    global_local.SPEC,
    multiscale.SPEC,
    span_search.SPEC,
    dynamic_hierarchical.SPEC,
    moh.SPEC,
    dha.SPEC,
    differential.SPEC,
    fixed_pattern.SPEC,
    linear.SPEC,
    lightning.SPEC,
]
_BY_NAME = {m.name: m for m in MECHANISMS}


def mechanisms() -> list[str]:
    """Registered mechanism names, in registry order."""
    return [m.name for m in MECHANISMS]


def get(name: str) -> Mechanism:
    """The registry record for ``name``."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown mechanism {name!r}; valid: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def pattern(T: int, S: int, causal: bool) -> str:
    return ("self" if T == S else "cross") + ("_causal" if causal else "")


def _run(q, k, v, mechanism, causal, scale, impl, options, need_lse, selection=None) -> AttentionOutput:
    mech = get(mechanism)
    # While dynamo traces, fast paths it can't trace run as one opaque op (attnlab/compile.py).
    compiling = impl != "reference" and torch.compiler.is_compiling()
    if compiling and not any(i.traced for i in mech.impls.values()):
        return _compile.run(q, k, v, mech, causal, scale, impl, options, need_lse, selection)
    shapes = check_qkv(q, k, v)
    mech.check_device(q.device)
    resolve_scale(scale, shapes.D)
    opts = mech.resolve(shapes.T, shapes.S, causal, options)
    pat = pattern(shapes.T, shapes.S, mech.is_causal(causal))
    if pat not in mech.patterns:
        raise ValueError(
            f"{mech.name} does not support {pat} attention; it supports: {', '.join(sorted(mech.patterns))}"
        )
    if selection is not None:
        mech.check_selection(selection, shapes.T, shapes.S)
    if impl == "reference":
        ref = mech.reference(q, k, v, causal=causal, scale=scale, selection=selection, **opts)
        return AttentionOutput(ref.out, ref.lse)
    name = _pick_impl(mech, q, k, v, causal, impl, opts, need_lse)
    if compiling and not mech.impls[name].traced:
        return _compile.run(q, k, v, mech, causal, scale, name, opts, need_lse, selection)
    given = {} if selection is None else {"selection": selection}  # only selecting mechanisms' impls take it
    return mech.impls[name].fn(q, k, v, causal=causal, scale=scale, **opts, **given)


def _pick_impl(mech: Mechanism, q, k, v, causal, impl: str, opts: dict, need_lse: bool) -> str:
    """The name of the impl that runs the call: ``auto`` takes the first that supports it."""
    if impl == "auto":
        for name, cand in mech.impls.items():
            if cand.reason(q, k, v, causal, need_lse, opts) is None:
                return name
        raise ValueError(f"no implementation of {mech.name} can run this call")  # every record has a general impl
    if impl not in mech.impls:
        raise ValueError(f"unknown impl {impl!r} for {mech.name}; valid: auto, reference, {', '.join(mech.impls)}")
    reason = mech.impls[impl].reason(q, k, v, causal, need_lse, opts)
    if reason is not None:
        raise ValueError(f"impl {impl!r} of {mech.name} cannot run this call: {reason}")
    return impl


_compile.bind(_run)  # the compiled path's op calls back into the eager one


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "dense",
    *,
    causal=False,
    scale: float | None = None,
    impl: str = "auto",
    selection=None,
    **options,
) -> Tensor:
    """Attention by mechanism name: q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> [B,H,T,Dv].

    ``impl="auto"`` runs the fastest implementation that supports the call, ``"reference"`` the
    dense oracle, any other name that implementation or a ValueError saying why it can't.
    Options not given take the registry defaults (``attnlab list`` shows them).
    ``selection``: for a mechanism that selects its keys from the data (``get(name).selects``), what
    ``get(name).select(q, k, ...)`` returned on a same-shaped call: the call attends under it instead
    of selecting again (HyLRA's layer reuse; inspecting what was kept).
    """
    return _run(q, k, v, mechanism, causal, scale, impl, options, need_lse=False, selection=selection).out


def attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "dense",
    *,
    causal=False,
    scale: float | None = None,
    impl: str = "auto",
    selection=None,
    **options,
) -> AttentionOutput:
    """Like :func:`attention` but returns ``(out, lse)``; lse [B,H,T] is ``-inf`` on rows with no key.

    Only for mechanisms whose record has ``has_lse``; any other raises ValueError with the record's
    ``no_lse`` reason before computing anything. Every impl that accepts ``need_lse`` returns one.
    """
    mech = get(mechanism)
    if not mech.has_lse:
        raise ValueError(f"{mech.name} has no log-sum-exp, so attention_lse cannot serve it: {mech.no_lse}")
    res = _run(q, k, v, mechanism, causal, scale, impl, options, need_lse=True, selection=selection)
    if res.lse is None:  # a broken record or impl: has_lse promised an LSE its supports() did not refuse
        raise RuntimeError(f"{mech.name} (impl={impl!r}) returned no LSE although its record has has_lse=True")
    return res


def mask(mechanism: str, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> Tensor:
    """The mechanism's dense boolean mask (True = allowed), always [B|1, Hkv|1, T, S]: B when the
    options differ per batch row (per-batch document ids, groups), ``kv_heads`` when the pattern
    differs per kv head (strided_shard); ``attnlab.reference.query_head_mask`` expands it to query heads."""
    return get(mechanism).dense_mask(T, S, causal=causal, kv_heads=kv_heads, **options)

"""The explicit list of mechanisms, and the public entry points over it.

Nothing registers itself at import time: ``MECHANISMS`` below is the whole list. The CLI, the
contract tests, the benchmarks and the Hugging Face adapter all iterate it, so a new mechanism is
covered by all of them once it has a record here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnlab import compile as _compile
from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_causal, check_qkv, resolve_scale
from attnlab.kernels import BlockLayout
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

PATTERNS = ("self", "self_causal", "cross", "cross_causal")
ALL_PATTERNS = frozenset(PATTERNS)


@dataclass(frozen=True)
class Impl:
    """A fast path. ``supports(q, k, v, causal, need_lse=False, **options)`` returns None when it can
    run the call, else the reason it can't."""

    fn: Callable[..., AttentionOutput]
    supports: Callable[..., str | None] | None = None

    def reason(self, q, k, v, causal, need_lse, opts) -> str | None:
        return None if self.supports is None else self.supports(q, k, v, causal, need_lse=need_lse, **opts)


@dataclass(frozen=True)
class Mechanism:
    name: str
    paper: str
    mask: (
        Callable[..., Tensor] | None
    )  # (T, S, *, causal, **options) -> bool [T,S] / [B,1,T,S]; None if data-dependent or no single mask
    impls: dict[str, Impl]  # fastest first: impl="auto" takes the first that supports the call
    check_options: Callable[[int, int, object, dict], dict]
    defaults: dict = field(default_factory=dict)
    patterns: frozenset[str] = ALL_PATTERNS
    example: Callable[[int], dict] = lambda S: {}  # small valid options for a key length S
    axis_causal: bool = False  # causal may be a tuple of per-axis bools
    layout: Callable[..., BlockLayout] | None = None  # (T, S, *, causal, **options), mask mechanisms
    per_kv_head: bool = False  # mask and layout differ per kv head: they take kv_heads=
    # Data-dependent mechanisms: select(q, k, *, causal, scale, **options) -> a selection with
    # .layout and .dense_mask() ([B, Hkv, T, S]); the oracle runs under that same selection.
    select: Callable | None = None
    # Composites that are not one softmax under a mask (gated mixtures over pooled keys) bring their
    # own dense oracle: oracle(q, k, v, *, causal, scale, **options) -> Reference.
    oracle: Callable | None = None
    # "softmax": a softmax attention over q, k, v (may stand in for any HF attention layer);
    # "linear" (kernelized / decayed linear attention), "relaxed" (non-softmax weights) and
    # "differential" (two maps packed in q, k) compute something else and need their own modules.
    family: str = "softmax"

    def _heads(self, kv_heads: int | None) -> dict:
        return {"kv_heads": kv_heads or 1} if self.per_kv_head else {}

    def block_layout(self, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> BlockLayout:
        """The block layout the executor runs for these options (mask mechanisms only)."""
        if self.layout is None:
            raise ValueError(f"{self.name} is not a mask mechanism and has no block layout")
        return self.layout(T, S, causal=causal, **self._heads(kv_heads), **_options(self, T, S, causal, options))

    def reference(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, **options
    ) -> _reference.Reference:
        """The dense oracle under this mechanism's mask: (out, weights [B,H,T,S], lse)."""
        opts = _options(self, q.shape[2], k.shape[2], causal, options)
        if self.oracle is not None:
            return self.oracle(q, k, v, causal=causal, scale=scale, **opts)
        groups = q.shape[1] // k.shape[1]
        if self.select is not None:
            sel = opts.pop("selection", None) or self.select(q, k, causal=causal, scale=scale, **opts)
            m = sel.dense_mask().to(q.device)  # [B, Hkv or 1, T, S]
            if m.shape[1] > 1:
                m = m.repeat_interleave(groups, dim=1)  # -> [B, H, T, S]
        else:
            m = self.mask(q.shape[2], k.shape[2], causal=causal, **self._heads(k.shape[1]), **opts).to(q.device)
        if self.per_kv_head:  # [Hkv, T, S] -> [H, T, S]: a group's query heads share the pattern
            m = m.repeat_interleave(groups, dim=0)
        return _reference.attention(q, k, v, m, scale=scale)

    def weights(self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, **options) -> Tensor:
        """Materialized attention weights [B, H, T, S], for analysis on small inputs."""
        return self.reference(q, k, v, causal=causal, scale=scale, **options).weights


def _grid_2d(S: int) -> tuple[int, int]:
    """The most square factorization of S."""
    a = max(d for d in range(1, math.isqrt(S) + 1) if S % d == 0)
    return a, S // a


def _neighborhood_example(S: int) -> dict:
    a, b = _grid_2d(S)
    if a >= 3:
        return {"shape": (a, b), "kernel_size": (3, min(5, b)), "dilation": (1, 1 + (b >= 10))}
    return {"shape": (S,), "kernel_size": min(5, S), "dilation": 1}


def _halo_example(S: int) -> dict:
    for blk in (4, 3, 2):
        for a in range(blk, S + 1, blk):
            if S % a == 0 and (S // a) % blk == 0:
                return {"shape": (a, S // a), "block_size": blk, "halo": 1}
    return {"shape": _grid_2d(S), "block_size": 1, "halo": 1}


def _document_example(S: int) -> dict:
    third = max(1, S // 3)
    lengths = [n for n in (third, third, S - 2 * third) if n > 0]
    return {"lengths": tuple(lengths)}


def _region_example(S: int) -> dict:
    """Text (group 0) sees everything; two subjects (1, 2) see themselves and the text."""
    groups = (torch.arange(S) * 3 // max(S, 1)).clamp(max=2)  # host: example option
    rules = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])  # host: example option
    return {"groups": groups, "rules": rules}


MECHANISMS: list[Mechanism] = [
    Mechanism(
        "dense",
        "Vaswani et al. 2017, arXiv 1706.03762",
        dense.mask,
        {"sdpa": Impl(dense.sdpa, dense.sdpa_supports), "blocksparse": Impl(dense.blocksparse)},
        lambda T, S, causal, o: {},
        layout=dense.block_layout,
    ),
    Mechanism(
        "sliding_window",
        "Longformer, arXiv 2004.05150; Mistral, arXiv 2310.06825",
        sliding_window.mask,
        {"blocksparse": Impl(sliding_window.attention)},
        sliding_window.check_options,
        sliding_window.DEFAULTS,
        example=lambda S: {"window": 5},
        layout=sliding_window.block_layout,
    ),
    Mechanism(
        "streaming",
        "StreamingLLM, arXiv 2309.17453",
        streaming.mask,
        {"blocksparse": Impl(streaming.attention)},
        streaming.check_options,
        streaming.DEFAULTS,
        example=lambda S: {"sinks": 2, "window": 4},
        layout=streaming.block_layout,
    ),
    Mechanism(
        "neighborhood",
        "NAT, arXiv 2204.07143; DiNAT, arXiv 2209.15001; NATTEN, arXiv 2403.04690",
        neighborhood.mask,
        {"blocksparse": Impl(neighborhood.attention)},
        neighborhood.check_options,
        neighborhood.DEFAULTS,
        frozenset({"self", "self_causal"}),
        _neighborhood_example,
        axis_causal=True,
        layout=neighborhood.block_layout,
    ),
    Mechanism(
        "halo",
        "HaloNet, arXiv 2103.12731",
        halo.mask,
        {"blocksparse": Impl(halo.attention)},
        halo.check_options,
        halo.DEFAULTS,
        frozenset({"self"}),
        _halo_example,
        layout=halo.block_layout,
    ),
    Mechanism(
        "document",
        "packed sequences, arXiv 2107.02027; FlashAttention-2 varlen, arXiv 2307.08691",
        document.mask,
        {"blocksparse": Impl(document.attention)},
        document.check_options,
        document.DEFAULTS,
        example=_document_example,
        layout=document.block_layout,
    ),
    Mechanism(
        "prefix_lm",
        "T5, arXiv 1910.10683; UniLM, arXiv 1905.03197",
        prefix_lm.mask,
        {"blocksparse": Impl(prefix_lm.attention)},
        prefix_lm.check_options,
        prefix_lm.DEFAULTS,
        frozenset({"self_causal", "cross_causal"}),
        lambda S: {"prefix": S // 3},
        layout=prefix_lm.block_layout,
    ),
    Mechanism(
        "strided_shard",
        "S2-Attention, arXiv 2407.17678",
        strided_shard.mask,
        {"blocksparse": Impl(strided_shard.attention)},
        strided_shard.check_options,
        strided_shard.DEFAULTS,
        example=lambda S: {"block_size": 4, "local_blocks": 2, "vert_stride": 3},
        layout=strided_shard.block_layout,
        per_kv_head=True,
    ),
    Mechanism(
        "block_topk",
        "InfLLM-V2 (MiniCPM4, arXiv 2506.07900); HyLRA, arXiv 2602.00777",
        None,  # data-dependent: the oracle runs under select()'s mask
        {"blocksparse": Impl(block_topk.attention)},
        block_topk.check_options,
        block_topk.DEFAULTS,
        example=lambda S: {"block_size": 4, "top_k": 3, "init_blocks": 1, "local_blocks": 1},
        select=block_topk.select,
    ),
    Mechanism(
        "region",
        "layout-guided masks: AnyMS, MODA (multi-subject / layout-to-image attention control)",
        region.mask,
        {"blocksparse": Impl(region.attention)},
        region.check_options,
        region.DEFAULTS,
        example=_region_example,
        layout=region.block_layout,
    ),
    Mechanism(
        "global_local",
        "UltraGen hierarchical attention, arXiv 2510.18775",
        None,  # no single mask: the oracle mixes two dense attentions
        {"composite": Impl(global_local.attention)},
        global_local.check_options,
        global_local.DEFAULTS,
        example=lambda S: {"window": 5, "pool": 3, "gate": 0.3},
        oracle=global_local.oracle,
    ),
    Mechanism(
        "multiscale",
        "hierarchical multi-scale attention: H-Transformer-1D arXiv 2107.11906; Focal arXiv 2107.00641",
        multiscale.mask,
        {"blocksparse": Impl(multiscale.attention)},
        multiscale.check_options,
        multiscale.DEFAULTS,
        example=lambda S: {"window": 3, "pools": (2, 4)},
        oracle=multiscale.oracle,
        layout=multiscale.block_layout,
    ),
    Mechanism(
        "span_search",
        "Superlinear multi-step attention (N=2 jump search), arXiv 2601.18401",
        None,  # one mask per span slot: the oracle builds them
        {"chunked": Impl(span_search.attention)},
        span_search.check_options,
        span_search.DEFAULTS,
        frozenset({"self_causal", "cross_causal"}),
        example=lambda S: {"num_spans": 2, "sw_index": 1, "backward_factor": 1.0, "forward_factor": 0.5},
        oracle=span_search.oracle,
    ),
    Mechanism(
        "dynamic_hierarchical",
        "DHSA, arXiv 2510.24606",
        None,  # data-dependent: the oracle runs under select()'s mask
        {"blocksparse": Impl(dynamic_hierarchical.attention)},
        dynamic_hierarchical.check_options,
        dynamic_hierarchical.DEFAULTS,
        frozenset({"self_causal", "cross_causal"}),
        example=lambda S: {"chunking": "fixed", "chunk_size": 4, "budget": 9, "local": 2, "sinks": 1},
        select=dynamic_hierarchical.select,
    ),
    Mechanism(
        "moh",
        "MoH (mixture-of-head attention), arXiv 2410.11842: gated heads; the layer is nn.MoHAttention",
        None,  # not one softmax: dense attention rows scaled by per-(token, head) gates
        {"sdpa": Impl(moh.attention)},
        moh.check_options,
        moh.DEFAULTS,
        # per-token gates need T: tests/test_moh.py
        example=lambda S: {"gates": torch.full((1, 1, 1, 1), 0.75)},  # host: example option
        oracle=moh.oracle,
    ),
    Mechanism(
        "dha",
        "DHA (decoupled-head attention), arXiv 2406.06567",
        dha.mask,  # dense per head; the groupings only route query heads to kv heads
        {"grouped_sdpa": Impl(dha.attention)},
        dha.check_options,
        dha.DEFAULTS,
        example=lambda S: {"key_groups": "strided", "value_groups": "contiguous"},
        oracle=dha.oracle,
    ),
    Mechanism(
        "differential",
        "DIFF Transformer, arXiv 2410.05258; Grouped Differential Attention (GDA), arXiv 2510.06949",
        None,  # two softmax maps subtracted: the oracle materializes both
        {"two_maps": Impl(differential.attention)},
        differential.check_options,
        differential.DEFAULTS,
        example=lambda S: {"lam": 0.7},
        oracle=differential.oracle,
        family="differential",  # q, k carry two maps in their halves: a layer must be built for it
    ),
    Mechanism(
        "fixed_pattern",
        "Deconstructing Attention, arXiv 2510.11602; sigmoid attention, arXiv 2409.04431",
        None,  # not a softmax under a mask: the oracle materializes the normalized weights
        {"chunked": Impl(fixed_pattern.attention)},
        fixed_pattern.check_options,
        fixed_pattern.DEFAULTS,
        example=lambda S: {"kind": "relu"},
        oracle=fixed_pattern.oracle,
        family="relaxed",  # not softmax weights: no LSE, and no stand-in for a pretrained softmax layer
    ),
    Mechanism(
        "linear",
        "Transformers are RNNs (Katharopoulos et al.), arXiv 2006.16236",
        None,  # not a softmax: the oracle is the parallel form
        {"fla": Impl(linear.fla, linear.fla_supports), "chunked": Impl(linear.attention)},
        linear.check_options,
        linear.DEFAULTS,
        example=lambda S: {"chunk_size": 8},
        oracle=linear.oracle,
        family="linear",
    ),
    Mechanism(
        "lightning",
        "Lightning Attention-2, arXiv 2401.04658; as in MiniCPM-SALA, arXiv 2602.11761",
        None,  # not a softmax: the oracle is the parallel form
        {"fla": Impl(lightning.fla, linear.fla_supports), "chunked": Impl(lightning.attention)},
        lightning.check_options,
        lightning.DEFAULTS,
        example=lambda S: {"chunk_size": 8},
        oracle=lightning.oracle,
        family="linear",
    ),
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


def _is_causal(mech: Mechanism, causal) -> bool:
    if mech.axis_causal and isinstance(causal, (tuple, list)):
        return any(causal)
    return check_causal(causal)


def check_option_names(mech: Mechanism, options) -> None:
    """Refuse option names the mechanism does not take (values are checked per call)."""
    unknown = set(options) - set(mech.defaults)
    if unknown:
        accepted = ", ".join(mech.defaults) or "none"
        raise ValueError(f"{mech.name} got unknown option(s) {sorted(unknown)}; it accepts: {accepted}")


def _options(mech: Mechanism, T: int, S: int, causal, options: dict) -> dict:
    """Defaults filled in, unknown names refused, values validated and normalized."""
    check_option_names(mech, options)
    _is_causal(mech, causal)
    return mech.check_options(T, S, causal, {**mech.defaults, **options})


def pattern(T: int, S: int, causal: bool) -> str:
    return ("self" if T == S else "cross") + ("_causal" if causal else "")


def _run(q, k, v, mechanism, causal, scale, impl, options, need_lse) -> AttentionOutput:
    mech = get(mechanism)
    # While dynamo traces, fast paths it can't trace run as one opaque op (attnlab/compile.py).
    compiling = impl != "reference" and torch.compiler.is_compiling()
    if compiling and not any(_compile.traced(mech.name, name) for name in mech.impls):
        return _compile.run(q, k, v, mech, causal, scale, impl, options, need_lse)
    shapes = check_qkv(q, k, v)
    resolve_scale(scale, shapes.D)
    opts = _options(mech, shapes.T, shapes.S, causal, options)
    pat = pattern(shapes.T, shapes.S, _is_causal(mech, causal))
    if pat not in mech.patterns:
        raise ValueError(
            f"{mech.name} does not support {pat} attention; it supports: {', '.join(sorted(mech.patterns))}"
        )
    if impl == "reference":
        ref = mech.reference(q, k, v, causal=causal, scale=scale, **opts)
        return AttentionOutput(ref.out, ref.lse)
    name = _pick_impl(mech, q, k, v, causal, impl, opts, need_lse)
    if compiling and not _compile.traced(mech.name, name):
        return _compile.run(q, k, v, mech, causal, scale, name, opts, need_lse)
    return mech.impls[name].fn(q, k, v, causal=causal, scale=scale, **opts)


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
    **options,
) -> Tensor:
    """Attention by mechanism name: q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> [B,H,T,Dv].

    ``impl="auto"`` runs the fastest implementation that supports the call, ``"reference"`` the
    dense oracle, any other name that implementation or a ValueError saying why it can't.
    Options not given take the registry defaults (``attnlab list`` shows them).
    """
    return _run(q, k, v, mechanism, causal, scale, impl, options, need_lse=False).out


def attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "dense",
    *,
    causal=False,
    scale: float | None = None,
    impl: str = "auto",
    **options,
) -> AttentionOutput:
    """Like :func:`attention` but returns ``(out, lse)``; lse [B,H,T] is ``-inf`` on rows with no key."""
    return _run(q, k, v, mechanism, causal, scale, impl, options, need_lse=True)


def mask(mechanism: str, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> Tensor:
    """The mechanism's dense boolean mask (True = allowed): [T, S]; [B, 1, T, S] when per-batch;
    [kv_heads, T, S] for per-head patterns (strided_shard)."""
    mech = get(mechanism)
    if mech.select is not None:
        raise ValueError(f"{mechanism}'s mask depends on q and k: use attnlab.get({mechanism!r}).select(q, k, ...)")
    if mech.mask is None:
        raise ValueError(f"{mechanism} mixes several attentions and has no single mask")
    opts = _options(mech, T, S, causal, options)
    return mech.mask(T, S, causal=causal, **mech._heads(kv_heads), **opts)

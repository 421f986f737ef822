"""What a mechanism is, as one record: the type every ``mechanisms/<name>.py`` declares as ``SPEC``.

A record holds everything the upper floors need to know about a mechanism (its kind, its
capabilities, its defaults, a test-size example, the benchmark's options), so that the CLI, the
benchmark, the quality suite, the Hugging Face adapter, policies, and later context parallelism and
analysis read capabilities from it and never check a mechanism's name. ``registry.py`` is the
explicit list of these records.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_causal
from attnlab.kernels import BlockLayout

PATTERNS = ("self", "self_causal", "cross", "cross_causal")
ALL_PATTERNS = frozenset(PATTERNS)


class Kind(enum.Enum):
    """What the oracle computes, which decides what a caller may do with the mechanism."""

    MASK = "mask"  # one softmax over the given k, v under a fixed mask: mask() and layout() exist
    SELECTION = "selection"  # one softmax under a mask that select(q, k) builds from the data
    COMPOSITE = "composite"  # softmax parts combined (mixtures, gates, pooled keys, two maps): own oracle
    LINEAR = "linear"  # kernelized / decayed linear attention: a fixed d x d state, no softmax
    RELAXED = "relaxed"  # normalized non-softmax weights (ReLU, sigmoid, fixed patterns)


@dataclass(frozen=True)
class Impl:
    """A fast path. ``supports(q, k, v, causal, need_lse=False, **options)`` returns None when it can
    run the call, else the reason it can't."""

    fn: Callable[..., AttentionOutput]
    supports: Callable[..., str | None] | None = None

    def reason(self, q, k, v, causal, need_lse, opts) -> str | None:
        return None if self.supports is None else self.supports(q, k, v, causal, need_lse=need_lse, **opts)


@dataclass(frozen=True)
class Workloads:
    """The options each suite runs the mechanism with, so no suite keeps a table keyed by name.

    ``efficiency(T)``: the benchmark's configuration at length T (None: the defaults).
    ``quality(L)``: the quality suite's options for a causal mixer over length L (None: the defaults).
    ``reach``: the option the quality suite's reach task (T3) sweeps, if any.
    ``heads``: heads of the quality model's mixer (d/heads each; spec §5.2).
    ``untrainable``: why the quality suite cannot train it as a causal token mixer (None: it can).
    """

    efficiency: Callable[[int], dict] | None = None
    quality: Callable[[int], dict] | None = None
    reach: str | None = None
    heads: int = 1
    untrainable: str | None = None


@dataclass(frozen=True)
class Mechanism:
    name: str
    paper: str
    kind: Kind
    impls: dict[str, Impl]  # fastest first: impl="auto" takes the first that supports the call
    check_options: Callable[[int, int, object, dict], dict]
    defaults: dict = field(default_factory=dict)
    # attention_lse returns the log-sum-exp of its softmax: partial results over disjoint key sets
    # merge exactly by it (core.merge_lse), as context parallelism and streaming capture need
    has_lse: bool = True
    no_lse: str | None = None  # why not, in one line: given exactly when has_lse is False
    drop_in: bool = True  # can stand in for a pretrained softmax attention layer (HF, nn.Attention)
    patterns: frozenset[str] = ALL_PATTERNS
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    example: Callable[[int], dict] = lambda S: {}  # small valid options for a key length S
    workloads: Workloads = Workloads()
    axis_causal: bool = False  # causal may be a tuple of per-axis bools
    per_kv_head: bool = False  # mask and layout differ per kv head: they take kv_heads=
    # (T, S, *, causal, **options) -> bool mask / BlockLayout; MASK mechanisms (a COMPOSITE may have them)
    mask: Callable[..., Tensor] | None = None
    layout: Callable[..., BlockLayout] | None = None
    # SELECTION: select(q, k, *, causal, scale, **options) -> a selection with .layout and .dense_mask()
    # ([B, Hkv, T, S]); the oracle runs under that same selection.
    select: Callable | None = None
    # Everything but MASK and SELECTION: oracle(q, k, v, *, causal, scale, **options) -> Reference.
    oracle: Callable | None = None

    def __post_init__(self):
        needs = {
            Kind.MASK: ("mask", "layout"),
            Kind.SELECTION: ("select",),
        }.get(self.kind, ("oracle",))
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise TypeError(f"{self.name}: a {self.kind.value} mechanism needs {', '.join(missing)}")
        one_line = self.no_lse is None or (bool(self.no_lse.strip()) and "\n" not in self.no_lse)
        if self.has_lse != (self.no_lse is None) or not one_line:
            raise TypeError(f"{self.name}: has_lse=False needs a one-line no_lse reason, and has_lse=True none")

    @property
    def selects(self) -> bool:
        """Builds its mask from the data; ``attention(..., selection=...)`` reuses a computed one."""
        return self.kind is Kind.SELECTION

    @property
    def fixed_state(self) -> bool:
        """Decodes with a fixed-size state rather than a KV cache."""
        return self.kind is Kind.LINEAR

    def is_causal(self, causal) -> bool:
        """``causal`` validated; per-axis tuples count as causal when any axis is."""
        if self.axis_causal and isinstance(causal, (tuple, list)):
            return any(causal)
        return check_causal(causal)

    def check_option_names(self, options) -> None:
        """Refuse option names the mechanism does not take (values are checked per call)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            accepted = ", ".join(self.defaults) or "none"
            raise ValueError(f"{self.name} got unknown option(s) {sorted(unknown)}; it accepts: {accepted}")

    def resolve(self, T: int, S: int, causal, options: dict) -> dict:
        """The options of a call: defaults filled in, unknown names refused, values validated and
        normalized (raises ValueError naming the option)."""
        self.check_option_names(options)
        self.is_causal(causal)
        return self.check_options(T, S, causal, {**self.defaults, **options})

    def _heads(self, kv_heads: int | None) -> dict:
        return {"kv_heads": kv_heads or 1} if self.per_kv_head else {}

    def block_layout(self, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> BlockLayout:
        """The block layout the executor runs for these options (mechanisms with a fixed mask)."""
        if self.layout is None:
            raise ValueError(f"{self.name} is a {self.kind.value} mechanism and has no fixed block layout")
        return self.layout(T, S, causal=causal, **self._heads(kv_heads), **self.resolve(T, S, causal, options))

    def reference(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, **options
    ) -> _reference.Reference:
        """The dense oracle under this mechanism's mask: (out, weights [B,H,T,S], lse)."""
        opts = self.resolve(q.shape[2], k.shape[2], causal, options)
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

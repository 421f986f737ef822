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
from attnlab.core import AttentionOutput, check_causal, nonnegative_int, positive_int
from attnlab.kernels import BlockLayout, block_sizes, block_sparse_attention

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
    run the call, else the reason it can't. ``traced``: under torch.compile, dynamo traces the path
    itself (plain tensor code or SDPA, which the compiler can fuse with the projections around it, and
    whose tensor options get gradients) instead of calling it through attnlab's custom op."""

    fn: Callable[..., AttentionOutput]
    supports: Callable[..., str | None] | None = None
    traced: bool = False

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
    devices: frozenset[str] = frozenset({"cpu", "cuda"})  # device types its impls are built and tested for
    example: Callable[[int], dict] = lambda S: {}  # small valid options for a key length S
    workloads: Workloads = Workloads()
    axis_causal: bool = False  # causal may be a tuple of per-axis bools
    per_kv_head: bool = False  # mask and layout differ per kv head: they take kv_heads=
    # MASK mechanisms (a COMPOSITE may have them), options resolved and keyword-only:
    # mask(T, S, *, causal, **options) -> bool [T, S] or [B|1, Hkv|1, T, S];
    # layout(T, S, *, causal, block, device=None, **options) -> BlockLayout (kernels.layout.cached_layout).
    # A MASK record without a "blocksparse" impl gets the executor under its layout.
    mask: Callable[..., Tensor] | None = None
    layout: Callable[..., BlockLayout] | None = None
    # SELECTION: select(q, k, *, causal, scale, **options) -> a selection with .layout and .dense_mask()
    # ([B, Hkv, T, S]); the oracle runs under that same selection.
    select: Callable | None = None
    selection_type: type | None = None  # SELECTION: what select() returns; ``selection=`` must be one
    # Everything but MASK and SELECTION: oracle(q, k, v, *, causal, scale, **options) -> Reference.
    oracle: Callable | None = None

    def __post_init__(self):
        needs = {
            Kind.MASK: ("mask", "layout"),
            Kind.SELECTION: ("select", "selection_type"),
        }.get(self.kind, ("oracle",))
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise TypeError(f"{self.name}: a {self.kind.value} mechanism needs {', '.join(missing)}")
        if self.kind is Kind.MASK and "blocksparse" not in self.impls:
            object.__setattr__(self, "impls", {**self.impls, "blocksparse": Impl(self.blocksparse)})
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

    def check_device(self, device) -> None:
        """Refuse inputs on a device type the record does not serve. ``meta`` (shapes only, no data)
        passes everywhere: the device guards trace every path on it."""
        if device.type != "meta" and device.type not in self.devices:
            served = ", ".join(sorted(self.devices))
            raise ValueError(f"{self.name} runs on {served}; q, k, v are on {device.type}")

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

    def check_selection(self, selection, T: int, S: int) -> None:
        """``selection=`` of a call with T queries and S keys: only a selecting mechanism takes one,
        and it must be what its ``select()`` returned on a same-shaped call."""
        if not self.selects:
            raise ValueError(
                f"selection= is for mechanisms that select their keys from the data; {self.name} is a "
                f"{self.kind.value} mechanism"
            )
        kind = self.selection_type.__name__
        if not isinstance(selection, self.selection_type) or (selection.layout.T, selection.layout.S) != (T, S):
            raise ValueError(f"selection must be a {kind} for T={T}, S={S} (from select() on a same-shaped call)")

    @staticmethod
    def _check_sizes(T, S, kv_heads) -> None:
        """Sizes given by hand (``mask``, ``block_layout``), checked before any tensor is built."""
        nonnegative_int("T", T)
        nonnegative_int("S", S)
        if kv_heads is not None:
            positive_int("kv_heads", kv_heads)

    def _heads(self, kv_heads: int | None) -> dict:
        return {"kv_heads": kv_heads or 1} if self.per_kv_head else {}

    def block_layout(self, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> BlockLayout:
        """The block layout the executor runs for these options (mechanisms with a fixed mask), for
        the default device's tiles (``kernels.block_sizes()``)."""
        if self.layout is None:
            raise ValueError(f"{self.name} is a {self.kind.value} mechanism and has no fixed block layout")
        self._check_sizes(T, S, kv_heads)
        opts = self.resolve(T, S, causal, options)
        return self.layout(T, S, causal=causal, block=block_sizes(), **self._heads(kv_heads), **opts)

    def blocksparse(self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, **options) -> AttentionOutput:
        """The executor under this mechanism's layout for q's device and its tiles (options resolved):
        the ``blocksparse`` impl of every MASK record."""
        T, S = q.shape[2], k.shape[2]
        block = block_sizes(q.device)
        lay = self.layout(T, S, causal=causal, block=block, device=q.device, **self._heads(k.shape[1]), **options)
        if lay.kv_blocks.shape[0] not in (1, q.shape[0]):  # per-batch options (document ids, groups)
            named = [n for n, o in options.items() if isinstance(o, Tensor) and o.shape == (lay.kv_blocks.shape[0], S)]
            raise ValueError(
                f"{', '.join(named) or 'the options'} has batch {lay.kv_blocks.shape[0]} but q has batch {q.shape[0]}"
            )
        return block_sparse_attention(q, k, v, lay, scale=scale)

    def dense_mask(self, T: int, S: int, *, causal=False, kv_heads: int | None = None, **options) -> Tensor:
        """The dense bool mask (True = allowed) [B|1, Hkv|1, T, S] on the host: B when the options
        differ per batch row, Hkv (= ``kv_heads``) when the pattern differs per kv head.
        ``reference.query_head_mask`` expands it to the query heads."""
        if self.select is not None:
            raise ValueError(f"{self.name}'s mask depends on q and k: use attnlab.get({self.name!r}).select(q, k, ...)")
        if self.mask is None:
            raise ValueError(f"{self.name} mixes several attentions and has no single mask")
        self._check_sizes(T, S, kv_heads)
        return self._dense_mask(T, S, causal, kv_heads, self.resolve(T, S, causal, options))

    def _dense_mask(self, T: int, S: int, causal, kv_heads: int | None, opts: dict) -> Tensor:
        m = self.mask(T, S, causal=causal, **self._heads(kv_heads), **opts)
        return m if m.dim() == 4 else m.view(1, 1, *m.shape)  # [T, S]: shared by the batch and heads

    def reference(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, selection=None, **options
    ) -> _reference.Reference:
        """The dense oracle under this mechanism's mask: (out, weights [B,H,T,S], lse); a selecting
        mechanism runs under ``selection`` when given, else under its own ``select()``."""
        opts = self.resolve(q.shape[2], k.shape[2], causal, options)
        if selection is not None:
            self.check_selection(selection, q.shape[2], k.shape[2])
        if self.oracle is not None:
            return self.oracle(q, k, v, causal=causal, scale=scale, **opts)
        if self.select is not None:
            sel = selection if selection is not None else self.select(q, k, causal=causal, scale=scale, **opts)
            m = sel.dense_mask()  # [B, Hkv or 1, T, S]
        else:
            m = self._dense_mask(q.shape[2], k.shape[2], causal, k.shape[1], opts)  # [B|1, Hkv|1, T, S]
        m = _reference.query_head_mask(m.to(q.device), q.shape[1])  # [B|1, H|1, T, S]
        return _reference.attention(q, k, v, m, scale=scale)

    def weights(self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, **options) -> Tensor:
        """Materialized attention weights [B, H, T, S], for analysis on small inputs."""
        return self.reference(q, k, v, causal=causal, scale=scale, **options).weights

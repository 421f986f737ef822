"""Block layouts: which key blocks each query block visits, and which of them need an element mask.

A layout is the one interface between a mask mechanism and the executor. Mechanisms state their mask
as a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over absolute positions (the FlexAttention
convention) plus a cheap, conservative key range per query block; ``build_layout`` classifies the
blocks exactly by evaluating the predicate only inside that range, so building never costs T x S.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Default tiles per device type: 64 is the measured sweet spot of the CPU path; FlexAttention's
# CUDA kernel is tuned for (and defaults to) 128 x 128 sparse blocks.
_DEVICE_BLOCK = {"cuda": (128, 128)}
_CPU_BLOCK = (64, 64)
_BLOCK: dict[str, int | None] = {"q": None, "k": None}  # set by ``block_size(...)``: overrides the default
_EVAL_BUDGET = 1 << 23  # predicate evaluations held at once while classifying blocks


def block_sizes(device: torch.device | str | None = None) -> tuple[int, int]:
    """The (query, key) block sizes for layouts that run on ``device``.

    The sizes set by :func:`block_size` when one is active; otherwise (128, 128) on CUDA (Flex's
    tile) and (64, 64) elsewhere. ``None`` means the host (CPU) default.
    """
    if _BLOCK["q"] is not None:
        return _BLOCK["q"], _BLOCK["k"]
    kind = torch.device(device).type if device is not None else "cpu"
    return _DEVICE_BLOCK.get(kind, _CPU_BLOCK)


@contextmanager
def block_size(q: int, k: int | None = None):
    """Tune the executor's tiles: ``with attnlab.kernels.block_size(128): ...``.

    Smaller blocks waste less area on partial blocks; larger ones run longer GEMMs. 64 is the
    measured sweet spot on CPU for windows of a few hundred keys. While active it overrides the
    per-device default of :func:`block_sizes` on every device.
    """
    k = q if k is None else k
    for name, val in (("q", q), ("k", k)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"block_size {name} must be a positive int, got {val!r}")
    old = dict(_BLOCK)
    _BLOCK.update(q=q, k=k)
    try:
        yield
    finally:
        _BLOCK.update(old)


_MOVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layout -> {device: moved layout}


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """For each (batch slice, kv-head slice, query block): the visited key blocks.

    kv_blocks [Bl, Hl, nQB, V] int64, ascending per row, -1 in unused slots.
    partial   [Bl, Hl, nQB, V] bool, True where the block needs ``mask_mod`` (others run unmasked).
    Bl is 1 (shared by the batch) or B; Hl is 1 (shared by heads) or Hkv. ``mask_mod`` receives the
    slice's batch and kv-head index as 0-d tensors.

    Layouts are host-side planning data: mechanisms build them once per shape and options, on the
    CPU, and :meth:`to` moves one to the device it runs on (once; the moved copy is cached). The
    invariant: ``mask_mod`` reads only tensors on the device of ``kv_blocks``.
    """

    T: int
    S: int
    block_q: int
    block_k: int
    kv_blocks: Tensor
    partial: Tensor
    mask_mod: MaskMod
    # Token order the layout is written in (self-attention over a grid): position t holds original
    # token order[t]. The executor permutes q, k, v by it and restores the output. None = identity.
    order: Tensor | None = None
    # Made from this call's data (a selection): a fresh layout every call, so no plan is ever reused.
    selected: bool = False
    # Predicates that read tensors (document ids, group tables, tile orders) must be rebuilt to run
    # on another device: ``rebind(device)`` returns the same predicate reading copies on ``device``.
    # None: the predicate reads only Python scalars and runs anywhere as it is.
    rebind: Callable[[torch.device], MaskMod] | None = None

    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.T / self.block_q)

    @property
    def n_k_blocks(self) -> int:
        return math.ceil(self.S / self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_blocks.device

    def to(self, device: torch.device | str) -> BlockLayout:
        """This layout with its tensors and its predicate's tensors on ``device``.

        Cached per (layout, device) and held weakly by the layout, so a model calling the same
        layout in every layer moves it once. Returns ``self`` when it already lives on ``device``.
        """
        device = torch.device(device)
        if self.device == device:
            return self
        moved = _MOVED.setdefault(self, {})
        if device not in moved:
            moved[device] = replace(
                self,
                kv_blocks=self.kv_blocks.to(device),
                partial=self.partial.to(device),
                order=None if self.order is None else self.order.to(device),
                mask_mod=self.mask_mod if self.rebind is None else self.rebind(device),
            )
        return moved[device]

    def block_density(self) -> float:
        """Visited blocks / all blocks, averaged over slices."""
        visited = (self.kv_blocks >= 0).sum().item()
        return visited / (self.kv_blocks.shape[0] * self.kv_blocks.shape[1] * self.n_q_blocks * self.n_k_blocks)

    def allowed_count(self) -> int:
        """Exact number of allowed (q, k) pairs, summed over slices; costs O(partial-block area)."""
        Bq, Bk, dev = self.block_q, self.block_k, self.device
        total = 0
        for b in range(self.kv_blocks.shape[0]):
            for h in range(self.kv_blocks.shape[1]):
                kvb, part = self.kv_blocks[b, h], self.partial[b, h]
                n = torch.arange(self.n_q_blocks, device=dev).unsqueeze(1).expand_as(kvb)
                rows = torch.clamp((n + 1) * Bq, max=self.T) - n * Bq
                cols = torch.clamp((kvb + 1) * Bk, max=self.S) - kvb * Bk
                full = (kvb >= 0) & ~part
                total += int((rows * cols)[full].sum())
                bt, ht = torch.tensor(b, device=dev), torch.tensor(h, device=dev)
                for n_i, kb in zip(*torch.nonzero(part, as_tuple=True)):
                    qi = torch.arange(n_i * Bq, min((n_i + 1) * Bq, self.T), device=dev).unsqueeze(1)
                    kb_ = int(kvb[n_i, kb])
                    ki = torch.arange(kb_ * Bk, min((kb_ + 1) * Bk, self.S), device=dev).unsqueeze(0)
                    total += int(self.mask_mod(bt, ht, qi, ki).sum())
        return total


def take(table: Tensor, *indices: Tensor) -> Tensor:
    """``table[i0, i1, ...]`` for predicates, with every index a tensor (0-d ones included).

    Plain ``table[b, idx]`` turns a 0-d ``b`` into a Python int: a device sync on CUDA and an
    error on ``meta``. Tensor indexing broadcasts the indices instead, on any device and under vmap.
    """
    return torch.ops.aten.index(table, list(indices))


def _candidates(ranges: list[tuple[Tensor, Tensor]], nKB: int, Bk: int) -> Tensor:
    """Candidate key blocks [nQB, C] (ascending, -1 = none) covering the union of token ranges."""
    cols = []
    for lo, hi in ranges:
        first = torch.clamp(lo // Bk, 0, nKB)
        last = torch.clamp((hi + Bk - 1) // Bk, 0, nKB)  # exclusive
        C = max(int((last - first).max()), 0)
        cand = first.unsqueeze(1) + torch.arange(C)  # host: layout planning
        cols.append(torch.where(cand < last.unsqueeze(1), cand, -1))
    cand = torch.cat(cols, dim=1).sort(dim=1).values
    dup = F.pad(cand[:, 1:] == cand[:, :-1], (1, 0), value=False)
    return torch.where(dup, -1, cand)


def _slice_blocks(mask_mod: MaskMod, b: int, h: int, T: int, S: int, Bq: int, Bk: int, cand: Tensor):
    """Classify one slice's candidate blocks: (nonempty, full), each [nQB, C]."""
    nQB, C = cand.shape
    nonempty = torch.zeros(nQB, C, dtype=torch.bool)  # host: layout planning
    full = torch.zeros(nQB, C, dtype=torch.bool)  # host: layout planning
    bt, ht = torch.tensor(b), torch.tensor(h)  # host: layout planning
    step = max(1, _EVAL_BUDGET // (Bq * max(C, 1) * Bk))
    for n0 in range(0, nQB, step):
        n = torch.arange(n0, min(nQB, n0 + step))  # host: layout planning
        kb = cand[n]  # [m, C]
        rq, rk = torch.arange(Bq), torch.arange(Bk)  # host: layout planning
        q_idx = (n.unsqueeze(1) * Bq + rq).view(-1, Bq, 1, 1)  # [m, Bq, 1, 1]
        kv_idx = (kb.clamp(min=0).unsqueeze(-1) * Bk + rk).unsqueeze(1)  # [m, 1, C, Bk]
        real_q, real_k = q_idx < T, (kv_idx < S) & (kb >= 0).view(len(n), 1, C, 1)
        allowed = mask_mod(bt, ht, q_idx.clamp(max=T - 1), kv_idx.clamp(max=S - 1)) & real_q & real_k
        nonempty[n] = allowed.any(dim=3).any(dim=1)
        # Padding rows don't care; padding keys must be masked, so such blocks are never full.
        full[n] = (allowed | ~real_q).all(dim=3).all(dim=1) & real_k.all(dim=3).squeeze(1)
    return nonempty, full & nonempty


def build_layout(
    mask_mod: MaskMod,
    T: int,
    S: int,
    *,
    key_ranges: list[tuple[Tensor, Tensor]] | None = None,
    batch: int = 1,
    heads: int = 1,
    block: tuple[int, int] | None = None,
    rebind: Callable[[torch.device], MaskMod] | None = None,
) -> BlockLayout:
    """Evaluate ``mask_mod`` inside ``key_ranges`` and return the exact block layout (on the host).

    key_ranges: a list of ``(lo, hi)`` int64 [nQB] token bounds (half-open) whose union contains
    every allowed key of each query block; loose is fine, tight is a bug. ``None`` means all keys
    (O(T*S) evaluations). batch/heads: distinct predicate slices (1 when it ignores b / h).
    rebind: see ``BlockLayout.rebind``; required when ``mask_mod`` reads tensors.
    """
    Bq, Bk = block or block_sizes()
    nQB, nKB = math.ceil(T / Bq), math.ceil(S / Bk)
    if T == 0 or S == 0:
        empty = torch.zeros(batch, heads, nQB, 0, dtype=torch.long)  # host: layout planning
        return BlockLayout(T, S, Bq, Bk, empty, empty.bool(), mask_mod, rebind=rebind)
    if key_ranges is None:
        key_ranges = [(torch.zeros(nQB, dtype=torch.long), torch.full((nQB,), S))]  # host: layout planning
    key_ranges = [(torch.as_tensor(lo).cpu(), torch.as_tensor(hi).cpu()) for lo, hi in key_ranges]  # host: planning
    cand = _candidates(key_ranges, nKB, Bk)
    per_slice = [_slice_blocks(mask_mod, b, h, T, S, Bq, Bk, cand) for b in range(batch) for h in range(heads)]
    V = max(max(int(ne.sum(1).max()) for ne, _ in per_slice), 0) if cand.shape[1] else 0
    kv_blocks = torch.full((batch * heads, nQB, V), -1, dtype=torch.long)  # host: layout planning
    partial = torch.zeros(batch * heads, nQB, V, dtype=torch.bool)  # host: layout planning
    for s, (nonempty, full) in enumerate(per_slice):
        sort_key = torch.where(nonempty, cand, torch.iinfo(torch.long).max)
        order = sort_key.argsort(dim=1, stable=True)[:, :V]  # visited blocks first, ascending
        keep = nonempty.gather(1, order)
        kv_blocks[s] = torch.where(keep, cand.gather(1, order), -1)
        partial[s] = keep & ~full.gather(1, order)
    shape = (batch, heads, nQB, V)
    return BlockLayout(T, S, Bq, Bk, kv_blocks.view(shape), partial.view(shape), mask_mod, rebind=rebind)


def query_positions(T: int, S: int, block_q: int | None = None, *, device=None) -> tuple[Tensor, Tensor]:
    """Key-axis positions (bottom-right aligned) of each query block's first and last row, [nQB]."""
    Bq = block_q or block_sizes()[0]
    n = torch.arange(math.ceil(T / Bq), device=device)
    first = n * Bq + (S - T)
    last = torch.clamp((n + 1) * Bq, max=T) - 1 + (S - T)
    return first, last


def layout_from_blocks(
    visited: Tensor,
    full: Tensor,
    T: int,
    S: int,
    block: tuple[int, int],
    mask_mod: MaskMod,
    *,
    selected=False,
    width: int | None = None,
) -> BlockLayout:
    """A layout from block-level decisions a mechanism made itself (analytic rules, selections).

    visited, full: bool [Bl, Hl, nQB, nKB]. ``full`` blocks run unmasked, so they must be allowed for
    every real row and key; blocks holding padding keys are demoted to partial here. ``selected``:
    the decisions come from this call's q/k (see ``BlockLayout.selected``). kv_blocks / partial live
    on ``visited.device``. ``width``: the most visited blocks of any row, when the caller knows it
    without looking at the data; otherwise it is read from ``visited``, the one host sync here.
    """
    Bl, Hl, nQB, nKB = visited.shape
    Bq, Bk = block
    full = full & visited
    if S % Bk:
        full = full.clone()
        full[..., -1] = False
    if width is None:
        width = int(visited.sum(-1).max()) if visited.numel() else 0  # host sync: V is a shape
    V = width
    cand = torch.arange(nKB, device=visited.device).expand(Bl, Hl, nQB, nKB)
    order = torch.where(visited, cand, nKB).sort(dim=-1).values[..., :V]  # visited ids first, ascending
    keep = order < nKB
    safe = order.clamp(max=nKB - 1)
    kv_blocks = torch.where(keep, safe, -1)
    partial = keep & ~full.gather(-1, safe)
    return BlockLayout(T, S, Bq, Bk, kv_blocks, partial, mask_mod, selected=selected)


def interval_blocks(lo: Tensor, hi: Tensor, S: int, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Block classification from per-row key intervals, with no per-key and no per-(row, block) work.

    lo, hi [rows, n]: each query row's allowed keys as disjoint intervals [lo, hi) (empty when
    hi <= lo); rows start at a query-block boundary. Returns visited, full: bool [ceil(rows / Bq),
    nKB]. Each interval adds its overlap to the (query block, key block) cells it touches: a
    whole-block run through a difference array, the two ragged ends directly. Disjoint intervals
    cover at most a block's width per row, so the summed cover is positive iff some row covers a key
    (visited) and equals rows x width iff every row covers all of it (full).
    """
    Bq, Bk = block
    rows, nKB = lo.shape[0], math.ceil(S / Bk)
    nQB, W = math.ceil(rows / Bq), nKB + 1  # one spare column for runs ending at the last block
    lo = lo.clamp(0, S)  # keys exist in [0, S) only
    hi = torch.maximum(hi.clamp(max=S), lo)
    real = hi > lo
    first, last = -(-lo // Bk), hi // Bk  # the whole blocks inside are first .. last - 1
    dev = lo.device
    cell = (torch.arange(rows, device=dev) // Bq * W).unsqueeze(1)  # [rows, 1] the row's query block in flat cells
    inner = ((first < last).int() * Bk).flatten()
    cov = torch.zeros(nQB * W, dtype=torch.int32, device=dev)
    cov.scatter_add_(0, (cell + first).flatten(), inner).scatter_add_(0, (cell + last).flatten(), -inner)
    cov = cov.view(nQB, W).cumsum(1, dtype=torch.int32).flatten()
    head = torch.where(real & (lo % Bk != 0), torch.minimum(hi, first * Bk) - lo, 0).int()
    tail = torch.where(real & (hi % Bk != 0) & (last >= first), hi - last * Bk, 0).int()
    cov.scatter_add_(0, (cell + lo // Bk).flatten(), head.flatten())
    cov.scatter_add_(0, (cell + last.clamp(max=nKB)).flatten(), tail.flatten())
    cov = cov.view(nQB, W)[:, :nKB]
    width = (S - torch.arange(nKB, device=dev) * Bk).clamp(max=Bk).int()  # [nKB]
    n_rows = (rows - torch.arange(nQB, device=dev) * Bq).clamp(max=Bq).int()  # [nQB] real rows per query block
    return cov > 0, cov == n_rows.unsqueeze(1) * width


def block_ranges(lo: Tensor, hi: Tensor, block_q: int) -> tuple[Tensor, Tensor]:
    """Per-row key bounds [T] -> per-query-block bounds [nQB]: the union of its rows' ranges."""
    pad = -lo.shape[0] % block_q
    big = int(hi.max()) + 1 if hi.numel() else 1
    lo = F.pad(lo, (0, pad), value=big).view(-1, block_q).amin(1)
    hi = F.pad(hi, (0, pad), value=0).view(-1, block_q).amax(1)
    return lo, hi


class TensorKeyedCache:
    """A small LRU for layouts built from tensor options (document ids, region groups).

    Keyed by the tensors' identity and version counters, so passing the same ids to every layer of a
    model builds the layout once, and an in-place edit of the ids rebuilds it. The cache holds the
    tensors themselves, so an id is never reused by another tensor while its entry lives.
    """

    def __init__(self, size: int = 16):
        self.size, self.entries = size, {}

    @staticmethod
    def _key(args: tuple) -> tuple:
        return tuple((id(a), a._version, tuple(a.shape)) if isinstance(a, Tensor) else a for a in args)

    def get(self, args: tuple, build: Callable[[], BlockLayout]) -> BlockLayout:
        key = self._key(args)
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)  # most recently used last
            return self.entries[key][1]
        value = build()
        self.entries[key] = (args, value)
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        return value


def cached_layout(build: Callable[..., BlockLayout]) -> Callable[..., BlockLayout]:
    """``build(T, S, *, causal, block, **options)`` made a mask mechanism's ``layout``, whose protocol
    is ``layout(T, S, *, causal, block, device=None, **options) -> BlockLayout``.

    A layout is planned on the host once per distinct arguments (tensor options are keyed by
    identity and version, see :class:`TensorKeyedCache`), so every layer of a model calling the
    same mask reuses it; given ``device``, it comes back moved there (once, see ``BlockLayout.to``).
    """
    cache = TensorKeyedCache(64)

    @functools.wraps(build)
    def layout(T: int, S: int, *, causal, block: tuple[int, int], device=None, **options) -> BlockLayout:
        block = tuple(block)
        names = sorted(options)
        hashable = tuple(causal) if isinstance(causal, list) else causal  # per-axis causal flags
        key = (T, S, hashable, block, tuple(names), *(options[n] for n in names))
        lay = cache.get(key, lambda: build(T, S, causal=causal, block=block, **options))
        return lay if device is None else lay.to(device)

    return layout


def causal_blocks(T: int, S: int, block: int, causal: bool, *, device=None) -> tuple[Tensor, Tensor]:
    """Block-level reach of the (bottom-right) causal constraint with square blocks, [nQB, nKB]:
    ``some`` — some real row of the query block may see some key of the block;
    ``every`` — every real row sees every key of it (a rule that allows the block may run it unmasked).
    Rows at negative positions (T > S) see nothing."""
    first, last = query_positions(T, S, block, device=device)
    J = torch.arange(math.ceil(S / block), device=device).view(1, -1)
    p0, p1 = first.view(-1, 1), last.view(-1, 1)
    some = (p1 >= 0).expand(len(first), J.shape[1])
    every = (p0 >= 0).expand_as(some)
    if causal:
        some = some & (J * block <= p1)
        every = every & ((J + 1) * block - 1 <= p0)
    return some, every

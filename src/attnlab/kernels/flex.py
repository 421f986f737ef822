"""FlexAttention bridge: our own block layout, handed to PyTorch's compiled FlexAttention
(Dong et al., "Flex Attention", arXiv 2412.05496).

The executor's CUDA path. ``layout_block_mask`` turns a :class:`BlockLayout` into a Flex
``BlockMask`` with ``BlockMask.from_kv_blocks``: the layout's partial blocks go in ``kv_*`` (Flex
evaluates the predicate there), its full blocks in ``full_kv_*`` (run unmasked), so Flex visits
exactly the blocks the layout classified and nothing is evaluated over T x S. The largest tensors
are the block index lists, [Bl, H', nQB, nKB] int32: at 64K tokens with 128-blocks that is 512 x 512
int32 = 1 MiB per head slice, and only layouts that differ per kv head have more than one slice.
Flex's CUDA kernels need sparse blocks of whole 128-row tiles, so a layout with smaller blocks
(strided shards, selections, a user's ``block_size(64)``) is coarsened exactly: the coarse blocks
are partial unless all their cells are full, and the predicate Flex evaluates looks up the layout's
own block state first (a [Bl, Hl, nQB, nKB] uint8 table at the layout's granularity).

``block_mask`` (``create_block_mask`` over the predicate, which evaluates all T x S pairs) stays as
the benchmark's FlexAttention *baseline*: what a user of Flex alone would run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import compute_dtype
from attnlab.kernels.layout import BlockLayout, MaskMod, take

_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # moved layout -> {(B', H', block): BlockMask}


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_mask_mod(layout: BlockLayout, H: int) -> MaskMod:
    """The layout's predicate as Flex calls it: query head h -> its kv-head slice, batch b -> its
    batch slice, and indices clamped into [0, T) x [0, S) so a predicate that indexes a table never
    reads out of bounds on the padding rows and columns of the last blocks (which stay masked)."""
    Bl, Hl = layout.kv_blocks.shape[:2]
    groups = max(H // max(Hl, 1), 1)
    T, S, mm = layout.T, layout.S, layout.mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        b_ = b if Bl > 1 else torch.zeros_like(b)
        h_ = h // groups if Hl > 1 else torch.zeros_like(h)
        inside = (q_idx < T) & (kv_idx < S)
        return mm(b_, h_, q_idx.clamp(max=T - 1), kv_idx.clamp(max=S - 1)) & inside

    return mask_mod


# Flex's CUDA kernels tile the sequence by up to 128 and need every sparse block to be a whole
# number of tiles (else the kernel has no valid config); other devices take the layout's blocks.
_CUDA_SPARSE_BLOCK = 128
_SKIP, _PARTIAL, _FULL, _NO_ROW = 0, 1, 2, 3  # block states; _NO_ROW: padding rows past T


def sparse_block(layout: BlockLayout, device: torch.device | str) -> tuple[int, int]:
    """The BlockMask's block size for ``layout`` on ``device``: the layout's own, or on CUDA the
    smallest multiple of 128 that its blocks divide (the layout is then coarsened exactly)."""
    if torch.device(device).type != "cuda":
        return layout.block_q, layout.block_k
    return math.lcm(layout.block_q, _CUDA_SPARSE_BLOCK), math.lcm(layout.block_k, _CUDA_SPARSE_BLOCK)


def _block_states(layout: BlockLayout) -> Tensor:
    """uint8 [Bl, Hl, nQB, nKB]: each block _SKIP, _PARTIAL or _FULL (nQB x nKB, never T x S)."""
    nKB = layout.n_k_blocks
    state = torch.zeros(*layout.kv_blocks.shape[:3], nKB + 1, dtype=torch.uint8, device=layout.device)
    code = torch.where(layout.partial, _PARTIAL, _FULL).to(torch.uint8)
    slot = torch.where(layout.kv_blocks >= 0, layout.kv_blocks, nKB)  # unused slots land in the spare column
    return state.scatter_(-1, slot, code)[..., :nKB]


def _coarsen(state: Tensor, layout: BlockLayout, block: tuple[int, int]) -> Tensor:
    """States of the ``block``-sized blocks, each a whole number of layout blocks: full when all of
    its real cells are full, skipped when none is visited, partial otherwise. Cells past the last
    key count as skipped, so a block holding padding keys is never full (Flex runs full blocks
    unmasked); cells past the last row don't count."""
    rq, rk = block[0] // layout.block_q, block[1] // layout.block_k
    nQB, nKB = math.ceil(layout.T / block[0]), math.ceil(layout.S / block[1])
    state = F.pad(state, (0, nKB * rk - state.shape[-1]), value=_SKIP)
    state = F.pad(state, (0, 0, 0, nQB * rq - state.shape[-2]), value=_NO_ROW)
    cells = state.unflatten(-1, (nKB, rk)).unflatten(-3, (nQB, rq))  # [Bl, Hl, nQB, rq, nKB, rk]
    visited = ((cells == _PARTIAL) | (cells == _FULL)).any(-1).any(-2)
    full = ((cells == _FULL) | (cells == _NO_ROW)).all(-1).all(-2) & visited
    return torch.where(full, _FULL, torch.where(visited, _PARTIAL, _SKIP)).to(torch.uint8)


def _fine_mask_mod(state: Tensor, layout: BlockLayout) -> MaskMod:
    """Inside a coarsened block, a key is allowed as the layout says: its own (fine) block full, or
    partial and allowed by the predicate. This keeps selections exact, whose predicates know
    nothing of which blocks were selected."""
    Bq, Bk, mm = layout.block_q, layout.block_k, layout.mask_mod

    def fine(b, h, q_idx, kv_idx):
        s = take(state, b, h, q_idx // Bq, kv_idx // Bk)
        return (s == _FULL) | ((s == _PARTIAL) & mm(b, h, q_idx, kv_idx))

    return fine


def _block_list(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Chosen blocks bool [..., nQB, nKB] as Flex's (num [..., nQB], indices [..., nQB, nKB]) int32.

    Flex reads the first ``num`` entries of each row (ascending here); it sizes its dense views by
    the last axis, so every row has nKB slots, the unused ones holding block 0 (never read).
    """
    nKB = chosen.shape[-1]
    ids = torch.where(chosen, torch.arange(nKB, device=chosen.device), nKB).sort(dim=-1).values
    return chosen.sum(-1, dtype=torch.int32), torch.where(ids < nKB, ids, 0).to(torch.int32)


def layout_block_mask(
    layout: BlockLayout, B: int, H: int, device: torch.device | str, block: tuple[int, int] | None = None
):
    """A Flex BlockMask for ``layout`` (moved to ``device``), for q with B batch rows and H heads.

    Batch and head axes stay 1 when the layout is shared (Flex broadcasts them); a per-kv-head
    layout is expanded to H query heads by repeating each kv head's lists over its group. A
    tile-order layout (``layout.order``) describes the *permuted* sequence: the caller permutes
    q, k, v as the executor does. ``block``: the BlockMask's block size, whole multiples of the
    layout's (default :func:`sparse_block`). Cached per (layout, device, B', H', block).

    Nothing of size T x S is built: the block tables are [Bl, H', nQB, nKB] (64K tokens at
    128-blocks: 512 x 512 int32 = 1 MiB per slice).
    """
    layout = layout.to(device)
    Bl, Hl = layout.kv_blocks.shape[:2]
    if Bl not in (1, B):
        raise ValueError(f"layout has batch {Bl} but q has batch {B}")
    if Hl != 1 and (H % Hl or H < Hl):
        raise ValueError(f"layout has {Hl} kv-head slices but q has {H} heads (need a multiple)")
    block = tuple(block or sparse_block(layout, device))
    if len(block) != 2 or block[0] % layout.block_q or block[1] % layout.block_k:
        fine = (layout.block_q, layout.block_k)
        raise ValueError(f"block must be whole multiples of the layout's blocks {fine}, got {block}")
    key = (Bl, H if Hl > 1 else 1, block)
    cache = _MASKS.setdefault(layout, {})
    if key not in cache:
        cache[key] = _build_block_mask(layout, H, block)
    return cache[key]


def _build_block_mask(layout: BlockLayout, H: int, block: tuple[int, int]):
    from torch.nn.attention.flex_attention import BlockMask

    state = _block_states(layout)
    if block != (layout.block_q, layout.block_k):
        layout = dataclasses.replace(layout, mask_mod=_fine_mask_mod(state, layout))
        state = _coarsen(state, layout, block)
    lists = (*_block_list(state == _PARTIAL), *_block_list(state == _FULL))
    Hl = layout.kv_blocks.shape[1]
    if Hl > 1 and H > Hl:  # each kv head's lists serve its group of query heads
        lists = tuple(x.repeat_interleave(H // Hl, dim=1) for x in lists)
    return BlockMask.from_kv_blocks(
        *lists, BLOCK_SIZE=block, mask_mod=flex_mask_mod(layout, H), seq_lengths=(layout.T, layout.S)
    )


def block_mask(layout: BlockLayout, B: int, H: int, device: torch.device | str, block: int = 128):
    """The benchmark's baseline: ``create_block_mask`` over the layout's predicate (T x S evaluations),
    in the original token order, with query head h mapped to its kv head."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = layout.to(device)
    Bl, Hl = layout.kv_blocks.shape[:2]
    mm = flex_mask_mod(layout, H)
    if layout.order is not None:  # the predicate is written over tile-order positions
        inv = torch.argsort(layout.order)
        base = mm
        mm = lambda b, h, q_idx, kv_idx: base(b, h, inv[q_idx], inv[kv_idx])  # noqa: E731
    return create_block_mask(
        mm, B if Bl > 1 else None, H if Hl > 1 else None, layout.T, layout.S, device=device, BLOCK_SIZE=block
    )


def _flex_head_dim(d: int) -> int:
    """Head widths Flex's kernels take everywhere: a power of two, at least 16."""
    return max(16, 1 << (d - 1).bit_length())


def _pad_last(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _run_flex(fn, q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> tuple[Tensor, Tensor]:
    kwargs = {"block_mask": mask, "scale": scale, "enable_gqa": q.shape[1] != k.shape[1]}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the LSE comes from the (later deprecated) return_lse flag
        return fn(q, k, v, return_lse=True, **kwargs)
    out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


_CPU_MODE = {"mode": None}  # None: CPU runs our own path; "eager"/"compiled": CPU runs Flex (tests)


@contextlib.contextmanager
def flex_on_cpu(mode: str = "eager"):
    """Route the executor's CPU calls to FlexAttention, for testing the CUDA path's logic on CPU.

    ``"eager"``: Flex's reference implementation (exact, returns the LSE, ignores block sparsity:
    it evaluates the predicate densely). ``"compiled"``: Flex compiled for CPU, which does follow
    the block lists but (torch 2.13) supports inference only and returns no LSE, so the LSE comes
    back as NaN. Neither supports backward on CPU.
    """
    if mode not in ("eager", "compiled"):
        raise ValueError(f"mode must be 'eager' or 'compiled', got {mode!r}")
    old = _CPU_MODE["mode"]
    _CPU_MODE["mode"] = mode
    try:
        yield
    finally:
        _CPU_MODE["mode"] = old


def use_flex(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _CPU_MODE["mode"] is not None)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float) -> tuple[Tensor, Tensor]:
    """FlexAttention under ``layout`` (already in its token order) -> (out [B,H,T,Dv], lse [B,H,T]).

    Head dims are zero-padded to a width Flex supports (exact: zero columns leave q.k unchanged;
    the scale is passed explicitly and the extra output columns are sliced off). The LSE is in
    natural log, as everywhere in attnlab; rows with no allowed key give 0 and LSE -inf.
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    lse_dtype = compute_dtype(q.dtype)
    if T == 0 or k.shape[2] == 0:
        return q.new_zeros(B, H, T, Dv), q.new_full((B, H, T), float("-inf"), dtype=lse_dtype)
    mask = layout_block_mask(layout, B, H, q.device)
    Dp, Dvp = _flex_head_dim(D), _flex_head_dim(Dv)
    qp, kp, vp = _pad_last(q, Dp), _pad_last(k, Dp), _pad_last(v, Dvp)
    if q.device.type == "cpu" and _CPU_MODE["mode"] == "compiled":
        with torch.no_grad():
            out = compiled_flex()(qp, kp, vp, block_mask=mask, scale=scale, enable_gqa=H != k.shape[1])
        lse = torch.full((B, H, T), float("nan"), dtype=lse_dtype, device=q.device)
        return out[..., :Dv], lse
    fn = _eager_flex() if q.device.type == "cpu" else compiled_flex()
    out, lse = _run_flex(fn, qp, kp, vp, mask, scale)
    # Flex already yields 0 / -inf on rows with no key; pin it so a NaN can never leak out.
    no_key = ~(lse > float("-inf"))
    out = out[..., :Dv].masked_fill(no_key.unsqueeze(-1), 0.0)
    return out, lse.to(lse_dtype).masked_fill(no_key, float("-inf"))


def flex_forward(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """Compiled FlexAttention forward only. On CPU, torch.compile supports Flex for inference only
    and without the LSE (torch 2.13), so this is what the benchmark can compare on CPU."""
    with torch.no_grad():
        return compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

"""The executor's batched path for small per-slice layouts (data-dependent block selections).

A selection (block top-k, DHSA) gives every batch row and kv head its own layout, new at every
call, so the planned path (``kernels.cpu``) plans and launches kernel calls slice by slice, afresh.
At training sizes (L of a few hundred, batch 64) that per-slice Python dominates: block_topk at
L=128 ran 40x slower than dense. Here the whole batch goes in a handful of calls instead: every
(slice, query block) gathers the key blocks it visits, padded to the layout's width V, and the
padded slots and partial blocks are masked:

    q  [R, G*Bq, D]        R = B * Hkv * nQB query blocks, each with its G heads' rows folded
    kv [R, V*Bk, D]        one index_select over whole blocks
    mask [R, G*Bq, V*Bk]   -inf on padding and on the disallowed keys of partial blocks

Each call sees a query block's whole key set, so its output and log-sum-exp are final (no merges),
and the kernel's own backward gives exact gradients; dK/dV scatter back with ``index_add_``. Work is
the visited area plus padding, never T x S; calls are chunked over R, and each chunk's mask is built
from the predicate's values on partial blocks, the only mask state kept between forward and backward.
``suits`` keeps the planned path for static layouts (their plans are cached) and for large
per-slice work, where it launches few calls per slice and runs full blocks without a mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.cpu import cpu_flash, executor_function, from_blocks, pad_keys, to_blocks
from attnlab.kernels.layout import BlockLayout

_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_CHUNK_ELEMS = 1 << 22  # bound on gathered-K plus mask elements per kernel call
# Per-slice score area (query rows x padded visited keys) up to which a selection runs here. Measured
# (2 threads, B1 H8 D64, block_topk's defaults): 1.9x faster than planned at 2K (area 2^21), 0.85x at
# 4K; at B64 L128 (the quality suite) 15-20x. Memory is no limit: only chunk-sized masks exist.
_SMALL_SLICE_AREA = 1 << 21


def suits(layout: BlockLayout, heads_per_kv: int) -> bool:
    """Whether this path beats the planned one: a selection (a fresh layout each call, so planning
    is never amortized; static per-head layouts keep their cached plans) with little work per slice."""
    Bl, Hl, nQB, V = layout.kv_blocks.shape
    if not layout.selected or V == 0:
        return False
    return nQB * heads_per_kv * layout.block_q * V * layout.block_k <= _SMALL_SLICE_AREA


class _Gather:
    """Per-call indices and masks, shared by forward and backward."""

    def __init__(self, q: Tensor, k: Tensor, layout: BlockLayout, scale: float):
        B, H, T, _ = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        self.layout, self.scale, self.T, self.S = layout, scale, T, S
        self.Bq, self.Bk, self.G, self.H, self.Hkv = layout.block_q, layout.block_k, H // Hkv, H, Hkv
        self.nQB, self.nKB = layout.n_q_blocks, layout.n_k_blocks
        kvb = layout.kv_blocks.expand(B, Hkv, -1, -1)  # [B, Hkv, nQB, V]
        self.V = kvb.shape[-1]
        self.device = dev = q.device
        slice_id = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1)
        self.rows_idx = (slice_id * self.nKB + kvb.clamp(min=0)).reshape(-1, self.V)  # [R, V] block rows
        self.valid = (kvb >= 0).reshape(-1, self.V)  # [R, V]: False on padding slots
        self.masked = not bool(((layout.kv_blocks >= 0) & ~layout.partial).all())  # padding or partial
        self.part_of, self.part_ok = self._partial(B, Hkv)
        per = self.V * self.Bk * (q.shape[-1] + self.G * self.Bq)  # gathered K + mask elements per item
        self.chunk = max(1, _CHUNK_ELEMS // per)

    def _partial(self, B: int, Hkv: int) -> tuple[Tensor, Tensor]:
        """The predicate on partial blocks only, kept for the backward: part_ok bool [P, G*Bq, Bk] for
        the layout's P partial (slice, query block, slot) triples, and part_of [R, V], each item slot's
        row in part_ok (-1: a full block or padding). Chunk masks are assembled from these, so the
        whole batch's [R, G*Bq, V*Bk] mask never exists."""
        lay = self.layout
        b, h, n, j = lay.partial.nonzero(as_tuple=True)  # [P]
        dev = self.device
        q_pos = torch.arange(self.Bq, device=dev).repeat(self.G)  # row r of a folded block is token r % Bq
        q_idx = (n.unsqueeze(1) * self.Bq + q_pos).clamp(max=self.T - 1).unsqueeze(2)  # [P, rows, 1]
        kv_idx = lay.kv_blocks[b, h, n, j].unsqueeze(1) * self.Bk + torch.arange(self.Bk, device=dev)  # [P, Bk]
        # One vmapped call over all slices: mask_mods see 0-d b and h, as the contract (and Flex) has it.
        ok = torch.vmap(lay.mask_mod)(b, h, q_idx, kv_idx.clamp(max=self.S - 1).unsqueeze(1)) if len(n) else None
        part_ok = torch.zeros(0, self.G * self.Bq, self.Bk, dtype=torch.bool, device=dev) if ok is None else ok
        part_ok = part_ok & (kv_idx < self.S).unsqueeze(1)  # padding keys past S
        part_of = torch.full(lay.partial.shape, -1, dtype=torch.long, device=dev)  # [Bl, Hl, nQB, V]
        part_of[b, h, n, j] = torch.arange(len(n), device=dev)
        return part_of.expand(B, Hkv, -1, -1).reshape(-1, self.V), part_ok

    def keys(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Visited blocks of items lo:hi from padded x [B, Hkv, nKB*Bk, D]: [1, hi-lo, V*Bk, D]."""
        D = x.shape[-1]
        flat = x.reshape(-1, self.Bk * D)  # [B*Hkv*nKB, Bk*D] whole blocks as rows
        return flat.index_select(0, self.rows_idx[lo:hi].flatten()).view(1, hi - lo, self.V * self.Bk, D)

    def mask_of(self, lo: int, hi: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
        """Additive mask [1, hi-lo, G*Bq, V*Bk] of items lo:hi (None when every slot is a full block)
        and their rows' has-a-key [hi-lo, G*Bq]."""
        c, rows = hi - lo, self.G * self.Bq
        if not self.masked:
            return None, torch.ones(c, rows, dtype=torch.bool, device=self.device)
        ok = self.valid[lo:hi].view(c, 1, self.V, 1).expand(c, rows, self.V, self.Bk).clone()
        at = self.part_of[lo:hi]
        i, j = (at >= 0).nonzero(as_tuple=True)
        ok[i, :, j] = self.part_ok[at[i, j]]  # [p, rows, Bk]
        ok = ok.view(c, rows, self.V * self.Bk)
        return torch.zeros((), dtype=dtype, device=ok.device).masked_fill(~ok, float("-inf")).unsqueeze(0), ok.any(-1)

    def chunks(self):
        R = self.rows_idx.shape[0]
        return ((lo, min(R, lo + self.chunk)) for lo in range(0, R, self.chunk))


def _blocks(x: Tensor, c: _Gather) -> Tensor:
    """[B, H, T, E] -> [R, G*Bq, E] (padded to whole query blocks)."""
    return to_blocks(x, c.Hkv, c.Bq, c.nQB).flatten(0, 2)


def _unblocks(x: Tensor, c: _Gather, B: int) -> Tensor:
    """Inverse of ``_blocks``: [R, G*Bq, *E] -> [B, H, T, *E]."""
    return from_blocks(x.unflatten(0, (B, c.Hkv, c.nQB)), c.H, c.T)


def _forward(q: Tensor, k: Tensor, v: Tensor, c: _Gather) -> tuple[Tensor, Tensor]:
    qb, kp, vp = _blocks(q, c), pad_keys(k, c.nKB * c.Bk), pad_keys(v, c.nKB * c.Bk)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(qb.shape)
    lse = torch.empty(qb.shape[:2], dtype=lse_dtype, device=q.device)
    has_key = torch.empty(qb.shape[:2], dtype=torch.bool, device=q.device)
    for lo, hi in c.chunks():
        mask, has_key[lo:hi] = c.mask_of(lo, hi, q.dtype)
        o, l_ = cpu_flash(qb[lo:hi].unsqueeze(0), c.keys(kp, lo, hi), c.keys(vp, lo, hi), 0.0, False, attn_mask=mask,
                       scale=c.scale)  # fmt: skip
        out[lo:hi], lse[lo:hi] = o[0], l_[0]
    # The CPU flash kernel returns out 0 and lse 0 for a fully masked row; a row with no key has lse -inf.
    if not bool(has_key.all()):
        out.masked_fill_(~has_key.unsqueeze(-1), 0)
        lse.masked_fill_(~has_key, float("-inf"))
    B = q.shape[0]
    return _unblocks(out, c, B), _unblocks(lse.unsqueeze(-1), c, B).squeeze(-1)


def _backward(dout, q, k, v, out, lse, c: _Gather):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb, ob, dob = _blocks(q, c), _blocks(out, c), _blocks(dout.to(q.dtype), c)
    # Rows with no key: +inf makes every probability exp(s - inf) = 0, so their gradients are 0.
    lb = _blocks(lse.masked_fill(torch.isneginf(lse), float("inf")).unsqueeze(-1), c).squeeze(-1).to(acc)
    kp, vp = pad_keys(k, c.nKB * c.Bk), pad_keys(v, c.nKB * c.Bk)
    D = kp.shape[-1]
    dq = torch.empty(qb.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(kp.numel() // (c.Bk * D), c.Bk * D, dtype=acc, device=q.device)  # whole blocks as rows
    dv = torch.zeros_like(dk)
    for lo, hi in c.chunks():
        mask, _ = c.mask_of(lo, hi, q.dtype)
        gq, gk, gv = _flash_bwd(
            dob[lo:hi].unsqueeze(0), qb[lo:hi].unsqueeze(0), c.keys(kp, lo, hi), c.keys(vp, lo, hi),
            ob[lo:hi].unsqueeze(0), lb[lo:hi].unsqueeze(0), 0.0, False, attn_mask=mask, scale=c.scale,
        )  # fmt: skip
        dq[lo:hi] = gq[0]
        idx = c.rows_idx[lo:hi].flatten()
        dk.index_add_(0, idx, gk.reshape(-1, c.Bk * D).to(acc))
        dv.index_add_(0, idx, gv.reshape(-1, c.Bk * D).to(acc))
    B = q.shape[0]
    dk, dv = (x.view(kp.shape)[:, :, : c.S].to(k.dtype) for x in (dk, dv))
    return _unblocks(dq, c, B), dk, dv


_GatheredCPU = executor_function(_Gather, _forward, _backward)


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float) -> tuple[Tensor, Tensor]:
    """q [B,H,T,D], k/v [B,Hkv,S,D] (equal head dims) -> out [B,H,T,D], lse [B,H,T]."""
    return _GatheredCPU.apply(q, k, v, layout, scale)

"""The block-sparse executor's CPU path.

Plan: split each query block's visited key blocks into *runs* of consecutive blocks, group runs of
equal length, and hand each group to PyTorch's fused CPU flash-attention kernel as one batched call:
the group's query blocks are the "heads" of the call and each one's key run is its key sequence.
When the runs of a group start at evenly spaced blocks (sliding windows, bands), the keys are an
overlapping strided *view* of K, so nothing is copied; otherwise the runs are gathered in bounded
chunks. Runs with no partial block run without a mask. A query block with several runs (sinks plus
a window, a 2-D neighbourhood) merges them exactly through their log-sum-exps.

GQA folds the G query heads that share a kv head into the rows of one call, so K/V are read once
per kv head. The backward calls the kernel's own backward per group with the *global* output and
LSE, which makes every group's gradient exact on its own (the flash-attention identity), and
scatters dK/dV back. Nothing of size T x S is ever allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import merge_lse
from attnlab.kernels.layout import BlockLayout
from attnlab.kernels.plan import Group, get_plan

# PyTorch's fused CPU flash kernel, which also returns the LSE: the executor's CPU paths and dense SDPA call it.
cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_MASK_CACHE_ELEMS = 1 << 25  # per plan: partial-block masks kept for reuse (128 MiB in fp32)


def _slice(x: Tensor, b: int, h: int, Bl: int, Hl: int) -> Tensor:
    """[B, Hkv, ...] -> [N, ...] for one layout slice; always a view so writes land in x."""
    if Bl == 1 and Hl == 1:
        return x.flatten(0, 1)
    if Bl == 1:
        return x[:, h]
    if Hl == 1:
        return x[b]
    return x[b, h].unsqueeze(0)


def to_blocks(x: Tensor, Hkv: int, Bq: int, nQB: int) -> Tensor:
    """[B, H, T, *E] -> [B, Hkv, nQB, G*Bq, *E]: a query block's rows for all G heads of a kv head."""
    B, H, T = x.shape[:3]
    E = x.shape[3:]
    if nQB * Bq != T:
        x = F.pad(x, (0, 0) * len(E) + (0, nQB * Bq - T))
    x = x.reshape(B, Hkv, H // Hkv, nQB, Bq, *E).transpose(2, 3)
    return x.reshape(B, Hkv, nQB, (H // Hkv) * Bq, *E)


def from_blocks(x: Tensor, H: int, T: int) -> Tensor:
    """The inverse of ``to_blocks``: [B, Hkv, nQB, G*Bq, *E] -> [B, H, T, *E]."""
    B, Hkv, nQB, rows = x.shape[:4]
    E = x.shape[4:]
    x = x.reshape(B, Hkv, nQB, H // Hkv, rows * Hkv // H, *E).transpose(2, 3)
    return x.reshape(B, H, -1, *E)[:, :, :T]


def pad_keys(x: Tensor, length: int) -> Tensor:
    """[B, h, S, E] zero-padded to ``length`` keys (whole key blocks), contiguous."""
    if x.shape[2] != length:
        x = F.pad(x, (0, 0, 0, length - x.shape[2]))
    return x.contiguous()


class _Ctx:
    """Per-call state shared by forward and backward: sizes, blocked views, the plan."""

    def __init__(self, q: Tensor, k: Tensor, layout: BlockLayout, scale: float):
        self.B, self.H, self.T, self.D = q.shape
        self.Hkv, self.S = k.shape[1], k.shape[2]
        self.G = self.H // self.Hkv
        self.layout, self.scale = layout, scale
        self.Bq, self.Bk = layout.block_q, layout.block_k
        self.nQB, self.S_pad = layout.n_q_blocks, layout.n_k_blocks * layout.block_k
        self.Bl, self.Hl = layout.kv_blocks.shape[:2]
        self.rows = self.G * self.Bq
        N = (self.B // self.Bl) * (self.Hkv // self.Hl)
        self.plan, self._masks = get_plan(layout, N * max(self.D, 1), self.rows)
        self.device = q.device
        self.q_pos = torch.arange(self.Bq, device=q.device).repeat(self.G)  # row r of a folded block: token r % Bq

    def keys(self, x: Tensor, g: Group) -> tuple[Tensor, Tensor | None]:
        """The group's key runs from padded x [B, Hkv, S_pad, E]: [N, m, span, E] and the token
        index used (None when the run is a strided view)."""
        xs = _slice(x, g.b, g.h, self.Bl, self.Hl)
        m, span = len(g.items), g.length * self.Bk
        if g.step is not None:
            sN, sS = xs.stride(0), xs.stride(1)
            off = xs.storage_offset() + int(g.starts[0]) * self.Bk * sS
            return xs.as_strided((xs.shape[0], m, span, xs.shape[2]), (sN, g.step * self.Bk * sS, sS, 1), off), None
        idx = g.key_index(self.Bk).flatten()
        N, E = xs.shape[0], xs.shape[2]
        if not xs.is_contiguous():
            return xs.index_select(1, idx).view(N, m, span, E), idx
        # Whole blocks as rows of [N * nKB, Bk * E]: index_select over dim 0 copies Bk * E elements
        # per index and runs on every thread (its dim-1 path is a serial loop).
        nKB = xs.shape[1] // self.Bk
        rows = (torch.arange(N, device=x.device).unsqueeze(1) * nKB + g.blocks.flatten()).flatten()  # [N * m * L]
        return xs.view(N * nKB, self.Bk * E).index_select(0, rows).view(N, m, span, E), idx

    def square(self, x: Tensor, g: Group) -> Tensor:
        """A square group's rows from blocked x [B, Hkv, nQB, G*Bq, E] as [N, G, m*Bq, E]: the G
        query heads become the call's heads, so causal rows stay in order."""
        xs = x.flatten(0, 1)[:, g.sel]  # [N, m, G*Bq, E]
        N, m, _, E = xs.shape
        return xs.view(N, m, self.G, self.Bq, E).transpose(1, 2).reshape(N, self.G, m * self.Bq, E)

    def unsquare(self, x: Tensor, g: Group) -> Tensor:
        """Inverse of ``square``: [N, G, m*Bq, E] -> [N, m, G*Bq, E]."""
        N, _, L, E = x.shape
        m = L // self.Bq
        return x.view(N, self.G, m, self.Bq, E).transpose(1, 2).reshape(N, m, self.G * self.Bq, E)

    def square_keys(self, x: Tensor, g: Group) -> Tensor:
        """The square's keys from padded x [B, Hkv, S_pad, E] as [N, G, m*Bk, E] (no copy)."""
        k0, L = int(g.blocks[0, 0]) * self.Bk, len(g.items) * self.Bk
        xs = x.flatten(0, 1)[:, k0 : k0 + L]
        return xs.unsqueeze(1).expand(xs.shape[0], self.G, L, xs.shape[2])

    def mask(self, g: Group, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """Additive mask [1, m or 1, rows, span] and row-has-a-key [m, rows], or (None, None).

        Masks are cached with the plan, so later calls and the backward skip the predicate: always
        when one mask serves the whole group (translation-invariant patterns such as windows), and
        otherwise while the plan's cache holds fewer than ``_MASK_CACHE_ELEMS`` elements.
        """
        if not g.masked:
            return None, None
        key = (id(g), dtype)
        if key in self._masks:
            return self._masks[key]
        add, has_key = self._build_mask(g, dtype)
        held = self._masks.setdefault("elements", 0)
        if add.shape[1] == 1 or held + add.numel() <= _MASK_CACHE_ELEMS:
            self._masks[key] = (add, has_key)
            self._masks["elements"] = held + add.numel()
        return add, has_key

    def _build_mask(self, g: Group, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The predicate runs on the group's partial blocks only: full blocks are allowed for every
        real row by the layout's contract (rows past T are padding and don't matter)."""
        m, L = g.blocks.shape
        part = self._partial_flags(g)  # [m, L]
        i, j = part.nonzero(as_tuple=True)  # [P] the partial (query block, key block) pairs
        q_idx = g.items[i].unsqueeze(1) * self.Bq + self.q_pos  # [P, rows]
        kv_idx = g.blocks[i, j].unsqueeze(1) * self.Bk + torch.arange(self.Bk, device=self.device)  # [P, Bk]
        bt, ht = torch.tensor(g.b, device=self.device), torch.tensor(g.h, device=self.device)
        ok = self.layout.mask_mod(
            bt, ht, q_idx.clamp(max=self.T - 1).unsqueeze(2), kv_idx.clamp(max=self.S - 1).unsqueeze(1)
        )
        ok = (ok & (kv_idx < self.S).unsqueeze(1)).expand(len(i), self.rows, self.Bk)  # [P, rows, Bk]
        has_key = (~part).any(1, keepdim=True).expand(m, self.rows).clone()  # a full block: every row
        has_key.index_put_((i,), ok.any(2), accumulate=True)  # logical or
        if m > 1 and bool((part == part[:1]).all()):
            per = len(i) // m  # the same partial slots in every query block (i is sorted)
            if bool((ok.view(m, per, self.rows, self.Bk) == ok[:per]).all()):
                m, i, j, ok = 1, i[:per], j[:per], ok[:per]  # translation-invariant: one shared mask
        add = torch.zeros(m, self.rows, L, self.Bk, dtype=dtype, device=self.device)
        add[i, :, j] = torch.zeros((), dtype=dtype, device=self.device).masked_fill(~ok, float("-inf"))
        return add.view(1, m, self.rows, L * self.Bk), has_key

    def _partial_flags(self, g: Group) -> Tensor:
        """Which of the group's blocks [m, L] the layout marks partial (visited ids are ascending)."""
        kvb = self.layout.kv_blocks[g.b, g.h][g.items]  # [m, V], -1 after the visited ids
        ids = torch.where(kvb >= 0, kvb, self.layout.n_k_blocks)
        at = torch.searchsorted(ids, g.blocks).clamp(max=kvb.shape[1] - 1)
        return self.layout.partial[g.b, g.h][g.items].gather(1, at)


def _forward(q: Tensor, k: Tensor, v: Tensor, c: _Ctx) -> tuple[Tensor, Tensor]:
    qb = to_blocks(q, c.Hkv, c.Bq, c.nQB)  # [B, Hkv, nQB, rows, D]
    kp, vp = pad_keys(k, c.S_pad), pad_keys(v, c.S_pad)
    Dv = v.shape[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Uninitialized: every visited block is written below; blocks no run visits are zeroed after.
    out = q.new_empty(c.B, c.Hkv, c.nQB, c.rows, Dv)
    lse = torch.empty((c.B, c.Hkv, c.nQB, c.rows), dtype=lse_dtype, device=q.device)
    seen = torch.zeros(c.Bl, c.Hl, c.nQB, dtype=torch.bool, device=q.device)
    for g in c.plan:
        sel = g.sel
        if g.square:
            q_sq, k_sq, v_sq = c.square(qb, g), c.square_keys(kp, g), c.square_keys(vp, g)
            o, lse_g = cpu_flash(q_sq, k_sq, v_sq, 0.0, True, scale=c.scale)
            o, lse_g = c.unsquare(o, g), c.unsquare(lse_g.unsqueeze(-1), g).squeeze(-1).to(lse_dtype)
        else:
            qs = _slice(qb, g.b, g.h, c.Bl, c.Hl)[:, sel]  # [N, m, rows, D]
            kg, _ = c.keys(kp, g)
            vg, _ = c.keys(vp, g)
            add, has_key = c.mask(g, q.dtype)
            o, lse_g = cpu_flash(qs, kg, vg, 0.0, False, attn_mask=add, scale=c.scale)
            lse_g = lse_g.to(lse_dtype)
            if has_key is not None and not bool(has_key.all()):
                lse_g = lse_g.masked_fill(~has_key, float("-inf"))  # the kernel reports 0 for empty rows
        o_s, l_s = _slice(out, g.b, g.h, c.Bl, c.Hl), _slice(lse, g.b, g.h, c.Bl, c.Hl)
        before = seen[g.b, g.h, sel]
        if bool(before.any()):
            fresh = g.items[~before]  # blocks this group reaches first: start them empty
            o_s[:, fresh], l_s[:, fresh] = 0, float("-inf")
            o, lse_g = merge_lse(o_s[:, sel], l_s[:, sel], o, lse_g)
        o_s[:, sel] = o
        l_s[:, sel] = lse_g
        seen[g.b, g.h, sel] = True
    if not bool(seen.all()):
        for b in range(c.Bl):
            for h in range(c.Hl):
                unseen = (~seen[b, h]).nonzero().flatten()
                _slice(out, b, h, c.Bl, c.Hl)[:, unseen] = 0
                _slice(lse, b, h, c.Bl, c.Hl)[:, unseen] = float("-inf")
    return from_blocks(out, c.H, c.T), from_blocks(lse, c.H, c.T)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, c: _Ctx):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb = to_blocks(q, c.Hkv, c.Bq, c.nQB)
    ob = to_blocks(out, c.Hkv, c.Bq, c.nQB)
    dob = to_blocks(dout.to(q.dtype), c.Hkv, c.Bq, c.nQB)
    # Rows with no key: +inf makes every probability exp(s - inf) = 0, so their gradients are 0.
    lb = to_blocks(lse.masked_fill(torch.isneginf(lse), float("inf")), c.Hkv, c.Bq, c.nQB)
    kp, vp = pad_keys(k, c.S_pad), pad_keys(v, c.S_pad)
    dq = torch.zeros(qb.shape, dtype=acc, device=q.device)
    dk = torch.zeros(kp.shape, dtype=acc, device=q.device)
    dv = torch.zeros(vp.shape, dtype=acc, device=q.device)
    lse_acc = torch.float32 if acc == torch.float32 else acc
    for g in c.plan:
        sl, sel = (g.b, g.h, c.Bl, c.Hl), g.sel
        if g.square:
            gq, gk, gv = _flash_bwd(
                c.square(dob, g), c.square(qb, g), c.square_keys(kp, g), c.square_keys(vp, g), c.square(ob, g),
                c.square(lb.unsqueeze(-1), g).squeeze(-1).to(lse_acc), 0.0, True, scale=c.scale,
            )  # fmt: skip
            _slice(dq, *sl)[:, sel] += c.unsquare(gq, g).to(acc)
            k0 = int(g.blocks[0, 0]) * c.Bk
            for dst, grad in ((dk, gk), (dv, gv)):  # the G query heads shared one kv head
                _slice(dst, *sl)[:, k0 : k0 + grad.shape[2]] += grad.sum(1).to(acc)
            continue
        kg, idx = c.keys(kp, g)
        vg, _ = c.keys(vp, g)
        add, _ = c.mask(g, q.dtype)
        lse_g = _slice(lb, *sl)[:, sel].to(lse_acc)
        gq, gk, gv = _flash_bwd(
            _slice(dob, *sl)[:, sel], _slice(qb, *sl)[:, sel], kg, vg, _slice(ob, *sl)[:, sel], lse_g,
            0.0, False, attn_mask=add, scale=c.scale,
        )  # fmt: skip
        _slice(dq, *sl)[:, sel] += gq.to(acc)  # query blocks are unique within a group
        for dst, grad in ((dk, gk), (dv, gv)):
            _scatter_keys(_slice(dst, *sl), grad.to(acc), g, c.Bk, idx)
    dq = from_blocks(dq, c.H, c.T).to(q.dtype)
    return dq, dk[:, :, : c.S].to(k.dtype), dv[:, :, : c.S].to(v.dtype)


def _scatter_keys(dst: Tensor, grad: Tensor, g: Group, Bk: int, idx: Tensor | None) -> None:
    """Add per-run key gradients grad [N, m, span, E] back into dst [N, S_pad, E].

    Evenly spaced runs overlap in a fixed pattern, so each of the run's L block positions is one
    strided slice-add over all m runs (dense, vectorized); anything else goes through index_add_.
    """
    N, m, span, E = grad.shape
    s0 = int(g.starts[0])
    if g.step == 0:
        dst[:, s0 * Bk : s0 * Bk + span] += grad.sum(1)
    elif g.step is not None:
        blocks = dst.unflatten(1, (-1, Bk))  # [N, nKB, Bk, E]
        per_block = grad.view(N, m, g.length, Bk, E)
        stop = (m - 1) * g.step + 1
        for j in range(g.length):
            blocks[:, s0 + j : s0 + j + stop : g.step] += per_block[:, :, j]
    else:
        dst.index_add_(1, idx, grad.reshape(N, m * span, E))


def executor_function(context, forward, backward) -> type[torch.autograd.Function]:
    """An autograd Function (q, k, v, layout, scale) -> (out, lse) from a per-call ``context`` class
    and the ``forward`` / ``backward`` that share it; lse carries no gradient."""

    class _Executor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, layout, scale):
            c = context(q, k, layout, scale)
            out, lse = forward(q, k, v, c)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.c = c
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            return (*backward(dout, *ctx.saved_tensors, ctx.c), None, None)

    return _Executor


_BlockSparseCPU = executor_function(_Ctx, _forward, _backward)


def block_sparse_cpu(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float) -> tuple[Tensor, Tensor]:
    """q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,D] (equal head dims) -> out [B,H,T,D], lse [B,H,T]."""
    return _BlockSparseCPU.apply(q, k, v, layout, scale)

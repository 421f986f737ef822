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

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import merge_lse
from attnlab.kernels.layout import BlockLayout

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_CHUNK_ELEMS = 1 << 22  # bound on gathered-K and mask elements per kernel call
_MASK_CACHE_ELEMS = 1 << 25  # per plan: partial-block masks kept for reuse (128 MiB in fp32)
_MAX_RUNS_PER_BLOCK = 4  # beyond this many runs per query block, gather instead of merging


@dataclass(frozen=True)
class _Group:
    b: int  # slice indices into the layout
    h: int
    items: Tensor  # [m] query block ids, unique
    blocks: Tensor  # [m, L] key blocks each query block visits in this call, ascending
    masked: bool
    step: int | None  # runs of consecutive blocks whose starts advance evenly: one strided view
    # A causal square: consecutive query blocks and the same number of key blocks from blocks[0, 0],
    # lower-triangular (the diagonal masks are exactly causal): one call with the kernel's own
    # causal mode, which skips the upper half. Only for layouts shared by batch and heads.
    square: bool = False

    @property
    def length(self) -> int:
        return self.blocks.shape[1]

    @property
    def starts(self) -> Tensor:
        return self.blocks[:, 0]

    def key_index(self, Bk: int) -> Tensor:
        """Token index of every key in the call, [m, L * Bk]."""
        return (self.blocks.unsqueeze(-1) * Bk + torch.arange(Bk)).flatten(1)

    @property
    def sel(self) -> slice | Tensor:
        """Index of the group's query blocks: a slice (a view, no copy) when they are consecutive."""
        first, m = int(self.items[0]), len(self.items)
        if int(self.items[-1]) - first == m - 1:
            return slice(first, first + m)
        return self.items


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _runs(kvb: Tensor, part: Tensor):
    """Runs of consecutive key blocks per query block: (n, ordinal, start, length, masked) tensors."""
    valid = kvb >= 0
    prev = F.pad(kvb, (1, 0), value=-2)[:, :-1]
    new = valid & (kvb != prev + 1)
    run_of = torch.cumsum(new.flatten(), 0) - 1  # run id of each flat entry (row-major)
    run_of = run_of[valid.flatten()]
    n_runs = int(new.sum())
    length = torch.bincount(run_of, minlength=n_runs)
    masked = torch.bincount(run_of, weights=part.flatten()[valid.flatten()].double(), minlength=n_runs) > 0
    n, v = torch.nonzero(new, as_tuple=True)
    ordinal = (torch.cumsum(new, dim=1) - 1)[n, v]  # which run of its query block this is
    return n, ordinal, kvb[n, v], length, masked


def _step(starts: Tensor) -> int | None:
    """The constant, non-negative start increment of a group, or None (no negative strides)."""
    d = torch.diff(starts)
    if len(d) == 0:
        return 0
    return int(d[0]) if bool((d == d[0]).all()) and int(d[0]) >= 0 else None


def _evenly_spaced(items: Tensor, starts: Tensor, max_period: int = 8, min_segment: int = 4):
    """Split a group so each part's starts advance evenly (one strided view per part).

    With query blocks smaller than key blocks, a window's first key block advances every p-th
    query block, so taking every p-th item makes the starts affine again. Otherwise (grids in tile
    order, where border tiles break the pattern) cut the group into maximal affine segments, and
    gather what is left in segments shorter than ``min_segment``.
    """
    if _step(starts) is not None:
        return [(items, starts)]
    for p in range(2, max_period + 1):
        parts = [(items[r::p], starts[r::p]) for r in range(p)]
        if all(_step(st) is not None for _, st in parts):
            return parts
    st = starts.tolist()
    parts, rest, i, m = [], [], 0, len(st)
    while i < m:
        j = i + 1
        if j < m and st[j] >= st[i]:
            d = st[j] - st[i]
            while j + 1 < m and st[j + 1] - st[j] == d:
                j += 1
            j += 1
        (parts if j - i >= min_segment else rest).append(torch.arange(i, j))
        i = j
    out = [(items[ix], starts[ix]) for ix in parts]
    if rest:
        ix = torch.cat(rest)
        out.append((items[ix], starts[ix]))
    return out


def _plan(layout: BlockLayout, n_slices_rows: int, span_cost: int) -> list[_Group]:
    groups = []
    Bl, Hl = layout.kv_blocks.shape[:2]
    for b in range(Bl):
        for h in range(Hl):
            kvb, part = layout.kv_blocks[b, h], layout.partial[b, h]
            # Scattered blocks (stripes, selections): each extra run per query block costs a merge
            # over the whole output, and uneven runs are copied anyway, so gather each query
            # block's blocks into one call instead.
            runs_info = _runs(kvb, part)
            if Bl == Hl == 1 and layout.block_q == layout.block_k:
                squares, runs_info = _staircases(layout, runs_info)
                groups += squares
            if len(runs_info[0]) > _MAX_RUNS_PER_BLOCK * max(int((kvb >= 0).any(1).sum()), 1):
                runs = _row_groups(kvb, part)
            else:
                runs = _run_groups(*runs_info, kvb.shape[-1])
                gathered = sum(len(it) for it, bl, _ in runs if _step(bl[:, 0]) is None)
                if gathered * 2 > len(runs_info[0]):
                    runs = _row_groups(kvb, part)
            for items, blocks, msk in runs:
                per = max(1, _CHUNK_ELEMS // (blocks.shape[1] * layout.block_k * max(n_slices_rows, span_cost)))
                for c in range(0, len(items), per):
                    it, bl = items[c : c + per], blocks[c : c + per]
                    step = _step(bl[:, 0]) if _is_run(bl) else None
                    groups.append(_Group(b, h, it, bl, msk, step))
    return groups


def _staircases(layout: BlockLayout, runs_info):
    """Find causal staircases among the runs and return (their groups, the runs left over).

    A staircase is a stretch of consecutive query blocks n, each with a single run [s, n + c] of full
    blocks ending in a partial diagonal block whose mask is exactly causal. It becomes an unmasked
    call over the shared prefix [s, d0) plus one causal square call, instead of one masked call per
    query block.
    """
    n, ordinal, start, length, masked = runs_info
    kvb, part = layout.kv_blocks[0, 0], layout.partial[0, 0]
    B = layout.block_q
    off = layout.S - layout.T
    single = torch.bincount(n, minlength=kvb.shape[0])[n] == 1
    last = start + length - 1
    # Only the last block of the run is partial, and it sits on the causal diagonal.
    n_partial = part.sum(1)[n]
    cand = single & (n_partial == 1) & part[n, length - 1] & (last * B == n * B + off)
    if off % B or not bool(cand.any()):
        return [], runs_info
    idx = cand.nonzero().flatten()
    diag_ok = _diagonal_is_causal(layout, n[idx], last[idx])
    idx = idx[diag_ok]
    groups, used = [], torch.zeros(len(n), dtype=torch.bool)
    i = 0
    items, starts = n[idx].tolist(), start[idx].tolist()
    while i < len(idx):
        j = i + 1
        while j < len(idx) and items[j] == items[j - 1] + 1 and starts[j] == starts[i]:
            j += 1
        if j - i >= 2:
            seg = torch.tensor(items[i:j])
            d0 = int(last[idx[i]])
            if d0 > starts[i]:  # the prefix every row of the stretch sees in full
                blocks = (starts[i] + torch.arange(d0 - starts[i])).expand(len(seg), -1)
                groups.append(_Group(0, 0, seg, blocks, False, 0))
            diag = (d0 + torch.arange(len(seg))).unsqueeze(1)
            groups.append(_Group(0, 0, seg, diag, False, None, square=True))
            used[idx[i:j]] = True
        i = j
    keep = ~used
    return groups, tuple(x[keep] for x in runs_info)


def _diagonal_is_causal(layout: BlockLayout, items: Tensor, diag: Tensor) -> Tensor:
    """Whether each diagonal block's mask equals j <= i (rows past T don't count). [m] bool."""
    B, T, S = layout.block_q, layout.T, layout.S
    r = torch.arange(B)
    q_idx = items.view(-1, 1, 1) * B + r.view(1, -1, 1)
    kv_idx = diag.view(-1, 1, 1) * B + r.view(1, 1, -1)
    zero = torch.tensor(0)
    allowed = layout.mask_mod(zero, zero, q_idx.clamp(max=T - 1), kv_idx.clamp(max=S - 1)) & (kv_idx < S)
    tril = r.view(-1, 1) >= r.view(1, -1)
    ok = (allowed == tril) | (q_idx >= T)
    return ok.flatten(1).all(1)


def _is_run(blocks: Tensor) -> bool:
    return blocks.shape[1] <= 1 or bool((torch.diff(blocks, dim=1) == 1).all())


def _run_groups(n, ordinal, start, length, masked, max_visits: int) -> list[tuple[Tensor, Tensor, bool]]:
    """Group runs of equal (ordinal, length, masked); split each into evenly spaced parts."""
    V = max_visits + 1
    # A group holds each query block at most once (the ordinal), so its results can be written or
    # merged with one indexed store.
    key = (ordinal * (V + 1) + length) * 2 + masked.long()
    out = []
    for kval in torch.unique(key).tolist():
        sel = key == kval
        L, msk = (kval // 2) % (V + 1), bool(kval % 2)
        for it, st in _evenly_spaced(n[sel], start[sel]):
            out.append((it, st.unsqueeze(1) + torch.arange(L), msk))
    return out


def _row_groups(kvb: Tensor, part: Tensor) -> list[tuple[Tensor, Tensor, bool]]:
    """Group whole query blocks by how many key blocks they visit; each call gathers them all."""
    count = (kvb >= 0).sum(1)
    out = []
    for cnt in torch.unique(count[count > 0]).tolist():
        items = (count == cnt).nonzero().flatten()
        out.append((items, kvb[items, :cnt], bool(part[items, :cnt].any())))
    return out


def _get_plan(layout: BlockLayout, rows_cost: int, span_cost: int) -> tuple[list[_Group], dict]:
    """The plan for a layout and call geometry, with a cache for its shared masks."""
    key = (rows_cost, span_cost)
    cache = _plans.setdefault(layout, {})
    if key not in cache:
        cache[key] = (_plan(layout, rows_cost, span_cost), {})
    return cache[key]


def _slice(x: Tensor, b: int, h: int, Bl: int, Hl: int) -> Tensor:
    """[B, Hkv, ...] -> [N, ...] for one layout slice; always a view so writes land in x."""
    if Bl == 1 and Hl == 1:
        return x.flatten(0, 1)
    if Bl == 1:
        return x[:, h]
    if Hl == 1:
        return x[b]
    return x[b, h].unsqueeze(0)


def _to_blocks(x: Tensor, Hkv: int, Bq: int, nQB: int) -> Tensor:
    """[B, H, T, *E] -> [B, Hkv, nQB, G*Bq, *E]: a query block's rows for all G heads of a kv head."""
    B, H, T = x.shape[:3]
    E = x.shape[3:]
    if nQB * Bq != T:
        x = F.pad(x, (0, 0) * len(E) + (0, nQB * Bq - T))
    x = x.reshape(B, Hkv, H // Hkv, nQB, Bq, *E).transpose(2, 3)
    return x.reshape(B, Hkv, nQB, (H // Hkv) * Bq, *E)


def _from_blocks(x: Tensor, H: int, T: int) -> Tensor:
    B, Hkv, nQB, rows = x.shape[:4]
    E = x.shape[4:]
    x = x.reshape(B, Hkv, nQB, H // Hkv, rows * Hkv // H, *E).transpose(2, 3)
    return x.reshape(B, H, -1, *E)[:, :, :T]


def _pad_keys(x: Tensor, length: int) -> Tensor:
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
        self.plan, self._masks = _get_plan(layout, N * max(self.D, 1), self.rows)
        self.q_pos = torch.arange(self.Bq).repeat(self.G)  # row r of a folded block is token r % Bq

    def keys(self, x: Tensor, g: _Group) -> tuple[Tensor, Tensor | None]:
        """The group's key runs from padded x [B, Hkv, S_pad, E]: [N, m, span, E] and the token
        index used (None when the run is a strided view)."""
        xs = _slice(x, g.b, g.h, self.Bl, self.Hl)
        m, span = len(g.items), g.length * self.Bk
        if g.step is not None:
            sN, sS = xs.stride(0), xs.stride(1)
            off = xs.storage_offset() + int(g.starts[0]) * self.Bk * sS
            return xs.as_strided((xs.shape[0], m, span, xs.shape[2]), (sN, g.step * self.Bk * sS, sS, 1), off), None
        idx = g.key_index(self.Bk).flatten()
        return xs.index_select(1, idx).view(xs.shape[0], m, span, xs.shape[2]), idx

    def square(self, x: Tensor, g: _Group) -> Tensor:
        """A square group's rows from blocked x [B, Hkv, nQB, G*Bq, E] as [N, G, m*Bq, E]: the G
        query heads become the call's heads, so causal rows stay in order."""
        xs = x.flatten(0, 1)[:, g.sel]  # [N, m, G*Bq, E]
        N, m, _, E = xs.shape
        return xs.view(N, m, self.G, self.Bq, E).transpose(1, 2).reshape(N, self.G, m * self.Bq, E)

    def unsquare(self, x: Tensor, g: _Group) -> Tensor:
        """Inverse of ``square``: [N, G, m*Bq, E] -> [N, m, G*Bq, E]."""
        N, _, L, E = x.shape
        m = L // self.Bq
        return x.view(N, self.G, m, self.Bq, E).transpose(1, 2).reshape(N, m, self.G * self.Bq, E)

    def square_keys(self, x: Tensor, g: _Group) -> Tensor:
        """The square's keys from padded x [B, Hkv, S_pad, E] as [N, G, m*Bk, E] (no copy)."""
        k0, L = int(g.blocks[0, 0]) * self.Bk, len(g.items) * self.Bk
        xs = x.flatten(0, 1)[:, k0 : k0 + L]
        return xs.unsqueeze(1).expand(xs.shape[0], self.G, L, xs.shape[2])

    def mask(self, g: _Group, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
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

    def _build_mask(self, g: _Group, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        q_idx = g.items.unsqueeze(1) * self.Bq + self.q_pos  # [m, rows]
        kv_idx = g.key_index(self.Bk)  # [m, span]
        bt, ht = torch.tensor(g.b), torch.tensor(g.h)
        allowed = self.layout.mask_mod(
            bt, ht, q_idx.clamp(max=self.T - 1).unsqueeze(2), kv_idx.clamp(max=self.S - 1).unsqueeze(1)
        )
        allowed = allowed & (kv_idx < self.S).unsqueeze(1)
        has_key = allowed.any(dim=2)
        if allowed.shape[0] > 1 and bool((allowed == allowed[:1]).all()):
            allowed = allowed[:1]  # translation-invariant patterns share one mask
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        return add.unsqueeze(0), has_key


def _forward(q: Tensor, k: Tensor, v: Tensor, c: _Ctx) -> tuple[Tensor, Tensor]:
    qb = _to_blocks(q, c.Hkv, c.Bq, c.nQB)  # [B, Hkv, nQB, rows, D]
    kp, vp = _pad_keys(k, c.S_pad), _pad_keys(v, c.S_pad)
    Dv = v.shape[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Uninitialized: every visited block is written below; blocks no run visits are zeroed after.
    out = q.new_empty(c.B, c.Hkv, c.nQB, c.rows, Dv)
    lse = torch.empty((c.B, c.Hkv, c.nQB, c.rows), dtype=lse_dtype)
    seen = torch.zeros(c.Bl, c.Hl, c.nQB, dtype=torch.bool)
    for g in c.plan:
        sel = g.sel
        if g.square:
            q_sq, k_sq, v_sq = c.square(qb, g), c.square_keys(kp, g), c.square_keys(vp, g)
            o, lse_g = _flash(q_sq, k_sq, v_sq, 0.0, True, scale=c.scale)
            o, lse_g = c.unsquare(o, g), c.unsquare(lse_g.unsqueeze(-1), g).squeeze(-1).to(lse_dtype)
        else:
            qs = _slice(qb, g.b, g.h, c.Bl, c.Hl)[:, sel]  # [N, m, rows, D]
            kg, _ = c.keys(kp, g)
            vg, _ = c.keys(vp, g)
            add, has_key = c.mask(g, q.dtype)
            o, lse_g = _flash(qs, kg, vg, 0.0, False, attn_mask=add, scale=c.scale)
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
    return _from_blocks(out, c.H, c.T), _from_blocks(lse, c.H, c.T)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, c: _Ctx):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb = _to_blocks(q, c.Hkv, c.Bq, c.nQB)
    ob = _to_blocks(out, c.Hkv, c.Bq, c.nQB)
    dob = _to_blocks(dout.to(q.dtype), c.Hkv, c.Bq, c.nQB)
    # Rows with no key: +inf makes every probability exp(s - inf) = 0, so their gradients are 0.
    lb = _to_blocks(lse.masked_fill(torch.isneginf(lse), float("inf")), c.Hkv, c.Bq, c.nQB)
    kp, vp = _pad_keys(k, c.S_pad), _pad_keys(v, c.S_pad)
    dq = torch.zeros(qb.shape, dtype=acc)
    dk = torch.zeros(kp.shape, dtype=acc)
    dv = torch.zeros(vp.shape, dtype=acc)
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
    dq = _from_blocks(dq, c.H, c.T).to(q.dtype)
    return dq, dk[:, :, : c.S].to(k.dtype), dv[:, :, : c.S].to(v.dtype)


def _scatter_keys(dst: Tensor, grad: Tensor, g: _Group, Bk: int, idx: Tensor | None) -> None:
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


class _BlockSparseCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        c = _Ctx(q, k, layout, scale)
        out, lse = _forward(q, k, v, c)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.c = c
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.c)
        return dq, dk, dv, None, None


def block_sparse_cpu(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float) -> tuple[Tensor, Tensor]:
    """q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,D] (equal head dims) -> out [B,H,T,D], lse [B,H,T]."""
    return _BlockSparseCPU.apply(q, k, v, layout, scale)

"""The one block-sparse executor every mask mechanism runs on.

``block_sparse_attention(q, k, v, layout)`` computes softmax attention restricted to a
:class:`BlockLayout`: empty blocks are skipped, full blocks run without a mask, partial blocks use
the layout's predicate, and partial results merge exactly through their log-sum-exps. On CPU the
path is ours: ``kernels.cpu`` plans a few large calls per layout slice, and ``kernels.gathered``
runs small per-slice layouts (selections at training sizes) for the whole batch at once; on CUDA
the layout itself (moved once with ``BlockLayout.to``) goes to FlexAttention as a BlockMask built
from its block lists (``kernels.flex.layout_block_mask``). ``kernels.flex.flex_on_cpu()`` routes CPU
calls through the same Flex path, for tests.

On the CPU, non-finite keys and values stay inside the rows whose mask allows them, as in the dense oracle: the
kernels add the mask to the scores (NaN + -inf is NaN) and multiply masked weights by V (0 * NaN is
NaN), so a NaN key in a partial block would reach every row of the block. When K or V holds a
non-finite value (one cheap reduction finds out), the call runs on finite K/V and a second call over
the same layout marks the rows that see a bad key (``_isolate_non_finite``). On CUDA the test would
be a host sync per call, so Flex's own NaN behaviour stands there (not yet measured on a GPU).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor

from attnlab.core import AttentionOutput, equal_head_dims, resolve_scale
from attnlab.kernels.cpu import block_sparse_cpu
from attnlab.kernels.flex import flex_attention, use_flex
from attnlab.kernels.gathered import gathered_attention, suits
from attnlab.kernels.layout import BlockLayout, MaskMod, block_size, block_sizes, build_layout

__all__ = ["BlockLayout", "MaskMod", "block_size", "block_sizes", "build_layout", "block_sparse_attention"]


_UNORDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unordered(layout: BlockLayout) -> BlockLayout:
    """The same layout over already-permuted tokens; one object per layout so its plan is cached."""
    if layout not in _UNORDERED:
        _UNORDERED[layout] = dataclasses.replace(layout, order=None)
    return _UNORDERED[layout]


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float | None = None
) -> AttentionOutput:
    """q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] under ``layout`` -> (out [B,H,T,Dv], lse [B,H,T])."""
    scale = resolve_scale(scale, q.shape[-1])
    if (layout.T, layout.S) != (q.shape[2], k.shape[2]):
        raise ValueError(f"layout is for T={layout.T}, S={layout.S} but got T={q.shape[2]}, S={k.shape[2]}")
    flex = use_flex(q.device)
    if flex:  # tables, order and predicate on q's device, moved once per layout
        layout = layout.to(q.device)
    if layout.order is not None:
        order = layout.order.to(q.device)
        q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
        out, lse = block_sparse_attention(q, k, v, _unordered(layout), scale=scale)
        inverse = torch.argsort(order)
        return AttentionOutput(out[:, :, inverse], lse[:, :, inverse])
    # A graph break under torch.compile would cost more than the isolation is worth there, and on an
    # accelerator the finiteness test is a host sync per call (it stalls the stream, and CUDA graphs
    # cannot hold it): there the NaN set is Flex's own. The CPU pays ~1% (measured in the note).
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not _all_finite(k, v):
        return _isolate_non_finite(q, k, v, layout, scale, flex)
    return _run(q, k, v, layout, scale, flex)


def _run(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float, flex: bool) -> AttentionOutput:
    if flex:
        return AttentionOutput(*flex_attention(q, k, v, layout, scale))
    # Small per-slice layouts (selections at training sizes) run batched; the rest is planned.
    run = gathered_attention if suits(layout, q.shape[1] // k.shape[1]) else block_sparse_cpu
    out, lse = run(*equal_head_dims(q, k, v), layout, scale)
    return AttentionOutput(out[..., : v.shape[-1]], lse)


def _all_finite(k: Tensor, v: Tensor) -> bool:
    """One fp32 reduction per tensor: any NaN or inf makes the sum non-finite. A sum that overflows
    only sends a finite input down the exact isolation path, so it is never wrong."""
    total = k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)
    return bool(torch.isfinite(total))


def _isolate_non_finite(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float, flex: bool
) -> AttentionOutput:
    """Attention whose non-finite keys reach only the rows that allow them, as the oracle's.

    A key with a non-finite component makes the scores (and so the whole output row and LSE) of
    every row that allows it NaN; a non-finite value component v[j, d] makes out[i, d] NaN for
    every row i that allows j. The rest is the attention over K/V with those entries zeroed.
    Which rows allow a bad key comes from the same layout: with all scores equal, a row's output
    is the mean of the bad-key indicator over its allowed keys, > 0 exactly when one is bad. Costs
    a second call, only when K or V is not finite.
    """
    bad_k = ~torch.isfinite(k).all(-1, keepdim=True)  # [B, Hkv, S, 1]
    bad_v = ~torch.isfinite(v)  # [B, Hkv, S, Dv]
    out, lse = _run(q, k.masked_fill(bad_k, 0), v.masked_fill(bad_v, 0), layout, scale, flex)
    bad = torch.cat([bad_k, bad_v], -1).float()  # [B, Hkv, S, 1 + Dv]
    width = max(16, 1 << (bad.shape[-1] - 1).bit_length())  # a head dim every kernel takes (Flex: 2^n >= 16)
    bad = torch.nn.functional.pad(bad, (0, width - bad.shape[-1]))  # [B, Hkv, S, width]
    B, H, T = q.shape[:3]
    zeros_q = torch.zeros(B, H, T, width, dtype=bad.dtype, device=q.device)
    seen = _run(zeros_q, torch.zeros_like(bad), bad, layout, 1.0, flex).out > 0  # [B, H, T, width]
    row_nan = seen[..., :1]  # [B, H, T, 1]: the row allows a key with a non-finite component
    nan = torch.tensor(float("nan"), dtype=out.dtype, device=q.device)
    # Added, not selected: the finite part keeps its gradient, as the other rows' do.
    out = out + torch.where(row_nan | seen[..., 1 : 1 + v.shape[-1]], nan, 0)
    lse = lse + torch.where(row_nan.squeeze(-1), nan.to(lse.dtype), 0)
    return AttentionOutput(out, lse)

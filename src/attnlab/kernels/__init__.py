"""The one block-sparse executor every mask mechanism runs on.

``block_sparse_attention(q, k, v, layout)`` computes softmax attention restricted to a
:class:`BlockLayout`: empty blocks are skipped, full blocks run without a mask, partial blocks use
the layout's predicate, and partial results merge exactly through their log-sum-exps. On CPU the
path is ours: ``kernels.cpu`` plans a few large calls per layout slice, and ``kernels.gathered``
runs small per-slice layouts (selections at training sizes) for the whole batch at once; on CUDA
the layout itself (moved once with ``BlockLayout.to``) goes to FlexAttention as a BlockMask built
from its block lists (``kernels.flex.layout_block_mask``). ``kernels.flex.flex_on_cpu()`` routes CPU
calls through the same Flex path, for tests.
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
    D, Dv = q.shape[-1], v.shape[-1]
    scale = resolve_scale(scale, D)
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
    if flex:
        return AttentionOutput(*flex_attention(q, k, v, layout, scale))
    # Small per-slice layouts (selections at training sizes) run batched; the rest is planned.
    run = gathered_attention if suits(layout, q.shape[1] // k.shape[1]) else block_sparse_cpu
    out, lse = run(*equal_head_dims(q, k, v), layout, scale)
    return AttentionOutput(out[..., :Dv], lse)

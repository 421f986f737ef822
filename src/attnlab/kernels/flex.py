"""FlexAttention bridge: the same mask predicate, compiled by PyTorch.

Used as the executor's CUDA path and as the benchmark's FlexAttention baseline. The predicate is
handed to ``create_block_mask`` unchanged, so both paths compute the same mask.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnlab.kernels.layout import BlockLayout


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(layout: BlockLayout, B: int, H: int, device: torch.device | str, block: int = 128):
    """A Flex BlockMask for ``layout``'s predicate, with query head h mapped to its kv head."""
    from torch.nn.attention.flex_attention import create_block_mask

    Bl, Hl = layout.kv_blocks.shape[:2]
    groups = H // max(Hl, 1)
    mm = layout.mask_mod
    if layout.order is not None:  # the predicate is written over tile-order positions
        inv = torch.argsort(layout.order).to(device)
        base = mm
        mm = lambda b, h, q_idx, kv_idx: base(b, h, inv[q_idx], inv[kv_idx])  # noqa: E731

    def mask_mod(b, h, q_idx, kv_idx):
        b_ = b if Bl > 1 else torch.zeros_like(b)
        h_ = h // groups if Hl > 1 else torch.zeros_like(h)
        return mm(b_, h_, q_idx, kv_idx)

    return create_block_mask(
        mask_mod, B if Bl > 1 else None, H if Hl > 1 else None, layout.T, layout.S, device=device, BLOCK_SIZE=block
    )


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float, mask=None):
    """Compiled FlexAttention under ``layout``'s predicate -> (out, lse), for CUDA tensors."""
    mask = block_mask(layout, q.shape[0], q.shape[1], q.device) if mask is None else mask
    gqa = q.shape[1] != k.shape[1]
    out, lse = compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True)
    return out, lse


def flex_forward(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """Compiled FlexAttention forward only. On CPU, torch.compile supports Flex for inference only
    and without the LSE (torch 2.13), so this is what the benchmark can compare on CPU."""
    with torch.no_grad():
        return compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

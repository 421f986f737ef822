"""HaloNet blocked local self-attention (Vaswani et al., "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones", arXiv 2103.12731, CVPR 2021).

Tokens are a row-major (H, W) grid cut into non-overlapping ``block_size`` x ``block_size`` query
blocks. Every query of a block attends to the block grown by ``halo`` on each side, clipped to the
image: positions outside the image are masked (strict local attention), not zero-padded keys as in
timm. The relative-position logits of the paper belong to a layer, not to the mask, and are left
to the caller. Non-causal self-attention only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnlab.core import int_tuple, near_square, nonnegative_int, positive_int
from attnlab.kernels import build_layout
from attnlab.kernels.layout import block_ranges, cached_layout, take
from attnlab.kernels.order import TileOrder, tile_sizes
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"shape": None, "block_size": 8, "halo": 3}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    if causal:
        raise ValueError("halo attention is non-causal (image blocks have no order); call it with causal=False")
    if opts["shape"] is None:
        raise ValueError("halo needs shape=(H, W), the token grid")
    shape = int_tuple("shape", opts["shape"], 2)
    b = positive_int("block_size", opts["block_size"])
    h = nonnegative_int("halo", opts["halo"])
    if shape[0] % b or shape[1] % b:
        raise ValueError(f"shape {shape} must be divisible by block_size={b} on both axes")
    if T != S or shape[0] * shape[1] != S:
        raise ValueError(
            f"halo is self-attention over the grid: need T == S == H*W={shape[0] * shape[1]}, got T={T}, S={S}"
        )
    return {"shape": shape, "block_size": b, "halo": h}


def _in_halo(q_idx: Tensor, kv_idx: Tensor, shape, b: int, h: int) -> Tensor:
    W = shape[1]
    qy, qx, ky, kx = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
    y0, x0 = (qy // b) * b, (qx // b) * b  # the query's block corner
    return (ky >= y0 - h) & (ky < y0 + b + h) & (kx >= x0 - h) & (kx < x0 + b + h)


def mask(T: int, S: int, *, causal: bool, shape, block_size: int, halo: int) -> Tensor:
    """bool [T, S]."""
    t = torch.arange(T)  # host: dense oracle mask
    return _in_halo(t.unsqueeze(1), t.unsqueeze(0), shape, block_size, halo)


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], shape, block_size: int, halo: int):
    """Block layout in tile order: halo blocks are the tiles, so a query block is a halo block."""
    b, h = block_size, halo
    tiles = TileOrder(shape, tile_sizes(shape, (b, b) if b >= 4 else None))
    order = tiles.order

    def predicate(order: Tensor):  # over tile-order positions
        return lambda bt, ht, q_idx, kv_idx: _in_halo(take(order, q_idx), take(order, kv_idx), shape, b, h)

    y, x = order // shape[1], order % shape[1]
    y0, x0 = (y // b) * b, (x // b) * b
    lo_c = [torch.clamp(y0 - h, min=0), torch.clamp(x0 - h, min=0)]
    hi_c = [torch.clamp(y0 + b + h, max=shape[0]) - 1, torch.clamp(x0 + b + h, max=shape[1]) - 1]
    lo, hi = tiles.box_range(lo_c, hi_c)
    lo, hi = block_ranges(lo, hi, block[0])
    lay = build_layout(
        predicate(order), T, T, key_ranges=[(lo, hi)], block=block, rebind=lambda d: predicate(order.to(d))
    )
    return dataclasses.replace(lay, order=order)


def _example(S: int) -> dict:
    for blk in (4, 3, 2):
        for a in range(blk, S + 1, blk):
            if S % a == 0 and (S // a) % blk == 0:
                return {"shape": (a, S // a), "block_size": blk, "halo": 1}
    return {"shape": near_square(S), "block_size": 1, "halo": 1}


SPEC = Mechanism(
    "halo",
    "HaloNet, arXiv 2103.12731",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    patterns=frozenset({"self"}),
    example=_example,
    workloads=Workloads(
        efficiency=lambda T: {"shape": near_square(T), "block_size": 8, "halo": 3},
        untrainable="serves non-causal self attention over a 2-D grid only",
    ),
    mask=mask,
    layout=layout,
)

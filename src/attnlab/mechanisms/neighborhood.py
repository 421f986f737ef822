"""Neighborhood attention over a 1-D, 2-D or 3-D token grid, with NATTEN semantics:
"Neighborhood Attention Transformer" (Hassani et al., arXiv 2204.07143), "Dilated Neighborhood
Attention Transformer" (arXiv 2209.15001) and "Faster Neighborhood Attention" (arXiv 2403.04690).

Tokens are a row-major flattening of ``shape``. Per axis (length n, kernel k, dilation d): a token
at coordinate i is in dilation group i % d with local coordinate i' = i // d, and only tokens of the
same group are neighbours. With n_g = ceil((n - g) / d) tokens in the group:

  non-causal: start = max(i' - k//2, 0) + [i' + R >= n_g] * (n_g - R - i' - 1),  R = k//2 + k%2 - 1
              end = start + k            (the window shifts at borders; it never shrinks)
  causal:     start = max(i' - k + 1, 0), end = i' + 1

and key j' is a neighbour when start <= j' < end. A token's neighbourhood is the product of its
per-axis windows. ``causal`` may be one bool or one per axis.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from attnlab.core import int_tuple, near_square
from attnlab.kernels import build_layout
from attnlab.kernels.layout import block_ranges, cached_layout, take
from attnlab.kernels.order import TileOrder, tile_sizes
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"shape": None, "kernel_size": 7, "dilation": 1}


def _causal_axes(causal, ndim: int) -> tuple[bool, ...]:
    if isinstance(causal, bool):
        return (causal,) * ndim
    if isinstance(causal, (tuple, list)) and len(causal) == ndim and all(isinstance(c, bool) for c in causal):
        return tuple(causal)
    raise ValueError(f"causal must be a bool or a tuple of {ndim} bools (one per axis), got {causal!r}")


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    shape = opts["shape"]
    shape = (S,) if shape is None else int_tuple("shape", shape, len(shape) if isinstance(shape, (tuple, list)) else 1)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must have 1 to 3 axes, got {shape}")
    if T != S or math.prod(shape) != S:
        n = math.prod(shape)
        raise ValueError(f"neighborhood is self-attention over a grid: need T == S == prod(shape)={n}, got {T=}, {S=}")
    kernel = int_tuple("kernel_size", opts["kernel_size"], len(shape))
    dilation = int_tuple("dilation", opts["dilation"], len(shape))
    _causal_axes(causal, len(shape))
    for a, (n, k, d) in enumerate(zip(shape, kernel, dilation)):
        if k * d > n:
            raise ValueError(f"kernel_size * dilation must be <= the axis length on axis {a}: {k} * {d} > {n}")
    return {"shape": shape, "kernel_size": kernel, "dilation": dilation}


def _axis_window(i: Tensor, n: int, k: int, d: int, causal: bool):
    """Dilation group, window start and end (local coordinates) of coordinate(s) i on one axis."""
    g, ip = i % d, i // d
    n_g = (n - g + d - 1) // d
    if causal:
        start = torch.clamp(ip - k + 1, min=0)
        return g, start, ip + 1
    right = k // 2 + k % 2 - 1
    start = torch.clamp(ip - k // 2, min=0) + (ip + right >= n_g).long() * (n_g - right - ip - 1)
    return g, start, start + k


def _coords(flat: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    out, rest = [], flat
    for n in reversed(shape):
        out.append(rest % n)
        rest = rest // n
    return out[::-1]


def _neighbors(q_idx: Tensor, kv_idx: Tensor, shape, kernel, dilation, causal_axes) -> Tensor:
    allowed = None
    for i, j, n, k, d, c in zip(_coords(q_idx, shape), _coords(kv_idx, shape), shape, kernel, dilation, causal_axes):
        g, start, end = _axis_window(i, n, k, d, c)
        jp = j // d
        axis_ok = (j % d == g) & (jp >= start) & (jp < end)
        allowed = axis_ok if allowed is None else allowed & axis_ok
    return allowed


def mask(T: int, S: int, *, causal, shape, kernel_size, dilation) -> Tensor:
    """bool [T, S]; options as ``check_options`` returns them (per-axis tuples)."""
    t = torch.arange(T)  # host: dense oracle mask
    axes = _causal_axes(causal, len(shape))
    return _neighbors(t.unsqueeze(1), t.unsqueeze(0), shape, kernel_size, dilation, axes)


def _predicate(order: Tensor | None, shape, kernel, dilation, causal_axes):
    """The mask over layout positions; ``order`` maps a tile-order position to its grid token."""

    def neighborhood(b, h, q_idx, kv_idx):
        if order is not None:
            q_idx, kv_idx = take(order, q_idx), take(order, kv_idx)
        return _neighbors(q_idx, kv_idx, shape, kernel, dilation, causal_axes)

    return neighborhood


@cached_layout
def layout(T: int, S: int, *, causal, block: tuple[int, int], shape, kernel_size, dilation):
    """Block layout in tile order for 2-D/3-D grids (``BlockLayout.order``), row-major for 1-D."""
    kernel, causal_axes = kernel_size, _causal_axes(causal, len(shape))
    tiles = TileOrder(shape, tile_sizes(shape)) if len(shape) > 1 else None
    order = tiles.order if tiles is not None else None
    neighborhood = _predicate(order, shape, kernel, dilation, causal_axes)
    rebind = None if order is None else lambda dev: _predicate(order.to(dev), shape, kernel, dilation, causal_axes)

    # Each row's neighbourhood lies inside the box between its lowest and highest corner.
    lo_c, hi_c = [], []
    tokens = order if order is not None else torch.arange(T)  # host: layout planning
    for i, n, k, d, c in zip(_coords(tokens, shape), shape, kernel, dilation, causal_axes):
        g, start, end = _axis_window(i, n, k, d, c)
        lo_c.append(start * d + g)
        hi_c.append((end - 1) * d + g)
    if tiles is not None:
        lo, hi = tiles.box_range(lo_c, hi_c)
    else:
        lo, hi = lo_c[0], hi_c[0] + 1
    lo, hi = block_ranges(lo, hi, block[0])
    lay = build_layout(neighborhood, T, T, key_ranges=[(lo, hi)], block=block, rebind=rebind)
    return dataclasses.replace(lay, order=tiles.order) if tiles is not None else lay


def _example(S: int) -> dict:
    a, b = near_square(S)
    if a >= 3:
        return {"shape": (a, b), "kernel_size": (3, min(5, b)), "dilation": (1, 1 + (b >= 10))}
    return {"shape": (S,), "kernel_size": min(5, S), "dilation": 1}


SPEC = Mechanism(
    "neighborhood",
    "NAT, arXiv 2204.07143; DiNAT, arXiv 2209.15001; NATTEN, arXiv 2403.04690",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    patterns=frozenset({"self", "self_causal"}),
    example=_example,
    workloads=Workloads(
        efficiency=lambda T: {"shape": near_square(T), "kernel_size": 13},
        quality=lambda L: {"shape": (L,), "kernel_size": L // 4},
        reach="kernel_size",
    ),
    axis_causal=True,
    mask=mask,
    layout=layout,
)

"""Tile orders for grid mechanisms.

A 2-D or 3-D neighbourhood is a box, but in row-major order a box is many short, far-apart runs
of keys, so a query block of 64 consecutive tokens (half a grid row) drags in whole grid rows of
keys. Ordering tokens tile by tile (8 x 8, or 4 x 4 x 4) makes each query block a compact tile whose
neighbours sit in a few nearby tiles: the layout gets dense blocks again. The executor applies the
order to q, k, v and undoes it on the output (``BlockLayout.order``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_TILES = {2: (8, 8), 3: (4, 4, 4)}


def tile_sizes(shape: tuple[int, ...], tile: tuple[int, ...] | None = None) -> tuple[int, ...]:
    tile = tile or DEFAULT_TILES.get(len(shape), (1,) * len(shape))
    return tuple(min(n, t) for n, t in zip(shape, tile))


def _coords(flat: Tensor, shape) -> list[Tensor]:
    out, rest = [], flat
    for n in reversed(shape):
        out.append(rest % n)
        rest = rest // n
    return out[::-1]


class TileOrder:
    """``order[t]`` = the row-major index of the token at position t of the tile order."""

    def __init__(self, shape: tuple[int, ...], tile: tuple[int, ...]):
        self.shape, self.tile = shape, tile
        self.grid = tuple(math.ceil(n / t) for n, t in zip(shape, tile))
        coords = _coords(torch.arange(math.prod(shape)), shape)  # host: layout planning
        tile_id = self._tile_id([c // t for c, t in zip(coords, tile)])
        inner = torch.zeros_like(tile_id)
        for c, t in zip(coords, tile):
            inner = inner * t + c % t
        self.order = torch.argsort(tile_id * math.prod(tile) + inner)
        self.inverse = torch.argsort(self.order)
        counts = torch.bincount(tile_id, minlength=math.prod(self.grid))
        self.tile_start = torch.cumsum(counts, 0) - counts  # first tile-order position of each tile
        self.tile_end = self.tile_start + counts

    def _tile_id(self, tile_coords: list[Tensor]) -> Tensor:
        tid = torch.zeros_like(tile_coords[0])
        for c, g in zip(tile_coords, self.grid):
            tid = tid * g + c
        return tid

    def box_range(self, lo: list[Tensor], hi: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Tile-order bounds [lo, hi) containing every token of the boxes lo <= coords <= hi (per axis).

        Row-major over tiles, the box's tokens lie between the start of its first tile and the end of
        its last one.
        """
        first = self._tile_id([x // t for x, t in zip(lo, self.tile)])
        last = self._tile_id([x // t for x, t in zip(hi, self.tile)])
        return self.tile_start[first], self.tile_end[last]

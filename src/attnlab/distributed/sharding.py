"""Sequence shardings for context parallelism: which token positions each of W ranks holds.

``contiguous`` is the plain split; ``zigzag`` is ring-flash-attention's causal balancing (2W chunks,
rank r holds chunks r and 2W-1-r, so every rank gets one early, cheap chunk and one late, costly one).
The area-balanced layout lives in :mod:`attnlab.distributed.area`. A sharding is plain host data:
integer ranges, turned into index tensors on the device of whatever tensor is being split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.core import positive_int

Ranges = tuple[tuple[int, int], ...]  # half-open [start, end) token ranges, ascending


@dataclass(frozen=True)
class Sharding:
    """A partition of ``range(length)`` over ``world`` ranks.

    ``ranges[r]`` lists rank r's half-open token ranges in ascending order; together the ranks'
    ranges cover every position exactly once.
    """

    kind: str  # "contiguous" | "zigzag" | "balanced"
    length: int  # T
    world: int  # W
    ranges: tuple[Ranges, ...]

    def check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world:
            raise ValueError(f"rank must be an int in [0, {self.world}) for world={self.world}, got {rank!r}")
        return rank

    def sizes(self) -> list[int]:
        """Tokens held by each rank [W]."""
        return [sum(hi - lo for lo, hi in rs) for rs in self.ranges]

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """The token positions rank ``rank`` holds: int64 [n_rank], ascending, on ``device``."""
        parts = [torch.arange(lo, hi, device=device) for lo, hi in self.ranges[self.check_rank(rank)]]
        return torch.cat(parts)


def check_sizes(T: int, world: int) -> None:
    """Every rank must hold at least one token."""
    positive_int("world", world)
    positive_int("T", T)
    if T < world:
        raise ValueError(f"T must be >= world so every rank holds a token, got T={T}, world={world}")


def _split(T: int, n: int) -> list[int]:
    """Sizes of n near-equal pieces of T (the first T % n are one longer)."""
    return [T // n + (i < T % n) for i in range(n)]


def _pieces(T: int, n: int) -> list[tuple[int, int]]:
    """n near-equal consecutive [start, end) pieces of range(T)."""
    out, start = [], 0
    for size in _split(T, n):
        out.append((start, start + size))
        start += size
    return out


def contiguous(T: int, world: int) -> Sharding:
    """Rank r holds one range; the ranges' lengths differ by at most 1."""
    check_sizes(T, world)
    return Sharding("contiguous", T, world, tuple((p,) for p in _pieces(T, world)))


def zigzag(T: int, world: int) -> Sharding:
    """2W near-equal chunks; rank r holds chunk r and chunk 2W-1-r (balanced for causal masks).

    Needs T >= 2W so every chunk is non-empty.
    """
    check_sizes(T, world)
    if T < 2 * world:
        raise ValueError(f"zigzag needs T >= 2 * world (2W chunks), got T={T}, world={world}")
    chunks = _pieces(T, 2 * world)
    return Sharding("zigzag", T, world, tuple((chunks[r], chunks[2 * world - 1 - r]) for r in range(world)))


def _check(sharding: Sharding) -> None:
    if not isinstance(sharding, Sharding):
        raise ValueError(f"sharding must be a Sharding (contiguous/zigzag/balanced), got {type(sharding).__name__}")


def _dim(x: Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    return dim % x.dim()


def shard(x: Tensor, sharding: Sharding, rank: int, dim: int = 2) -> Tensor:
    """This rank's part of ``x`` along ``dim``: x.index_select(dim, positions(rank)), on x's device.

    x [..., T, ...] (T on ``dim``; 2 is the sequence axis of [B, H, T, D]) -> [..., n_rank, ...].
    """
    _check(sharding)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
    d = _dim(x, dim)
    if x.shape[d] != sharding.length:
        raise ValueError(f"x has length {x.shape[d]} on dim {dim} but the sharding is for T={sharding.length}")
    return x.index_select(d, sharding.positions(rank, device=x.device))


def unshard(parts: list[Tensor], sharding: Sharding, dim: int = 2) -> Tensor:
    """The exact inverse of :func:`shard`: the W ranks' parts scattered back into token order.

    parts[r] [..., n_r, ...] -> [..., T, ...]; differentiable (a concatenation and a gather).
    """
    _check(sharding)
    if not isinstance(parts, (list, tuple)) or len(parts) != sharding.world:
        n = len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__
        raise ValueError(f"parts must be a list of world={sharding.world} tensors, got {n}")
    if not all(isinstance(p, Tensor) for p in parts):
        raise ValueError(f"parts must hold Tensors, got {[type(p).__name__ for p in parts]}")
    d = _dim(parts[0], dim)
    for r, (p, n) in enumerate(zip(parts, sharding.sizes())):
        if p.dim() != parts[0].dim() or p.shape[d] != n:
            msg = f"parts[{r}] must have {n} positions on dim {dim} (rank {r}'s share), got {tuple(p.shape)}"
            raise ValueError(msg)
    dev = parts[0].device
    held = torch.cat([sharding.positions(r, device=dev) for r in range(sharding.world)])  # [T]: token at each slot
    return torch.cat(list(parts), dim=d).index_select(d, torch.argsort(held))  # slot order -> token order

"""Rotary position embedding (RoFormer, Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv 2104.09864), in the rotate-half layout of Llama / Hugging Face.

Channel pair ``(i, i + D/2)`` of a head vector at position ``p`` is rotated by the angle
``p * base^(-2i/D)``:

    rope(x, p) = x * cos(p θ) + rotate_half(x) * sin(p θ),   rotate_half([x1, x2]) = [-x2, x1]

so ``rope(q, p_q) · rope(k, p_k)`` depends on ``p_q - p_k`` only. The cos/sin tables are computed in
fp64 (exact angles for long positions), cached per device and dtype, and grown to the next power
of two when a longer position is asked for; the entry of a position never depends on the table's
length, so a decoding step with ``offset=t`` gets bit-identical factors to row ``t`` of a full pass.
As everywhere in the library, positions are 0-based and ``offset`` is the absolute position of row 0.
(HyPE, spec §7.4, puts RoPE on some layers and none on others: that is ``rope=True/False`` per
``attnlab.nn.Attention``.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, T, D]; cos, sin [T, D] or [B, T, D] (broadcast over heads)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """``RotaryEmbedding(head_dim, base=10000.0)``; ``rope(x, positions=None, offset=0)`` rotates
    x [B, h, T, D] at ``positions`` (int [T] or [B, T]), by default ``offset + arange(T)``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rope needs an even positive head_dim, got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"rope_base must be a number > 1, got {base!r}")
        self.head_dim, self.base = head_dim, float(base)
        # θ_i = base^(-2i/D), i < D/2, kept in fp64: the tables are cast to the input dtype at the end
        self.inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # host: fp64 table
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def tables(self, length: int, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [L, D] for positions 0..L-1 with L >= length, from the cache when it is long enough."""
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is None or hit[0].shape[0] < length:
            n = 1 << max(length - 1, 0).bit_length()  # next power of two >= length
            # [n, D/2], in fp64 on the host, then cast and moved once per (device, dtype) below
            angles = torch.arange(n, dtype=torch.float64).unsqueeze(1) * self.inv_freq  # host: cached per device
            angles = torch.cat((angles, angles), dim=-1)  # [n, D]: pair (i, i + D/2) shares an angle
            hit = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
            self._cache[key] = hit
        return hit

    def angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [..., D] at positions [...], computed in the graph under torch.compile: the
        same fp64 products as the tables, on the positions' device."""
        angles = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(positions.device)  # [..., D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: Tensor, positions: Tensor | None = None, offset: int = 0) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"rope input must be [B, heads, T, head_dim={self.head_dim}], got {tuple(x.shape)}")
        T = x.shape[2]
        if positions is None:
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset must be a non-negative int, got {offset!r}")
            if torch.compiler.is_compiling():  # growing the cache would specialize on the length
                return apply_rotary(x, *self.angles(offset + torch.arange(T, device=x.device), x.dtype))
            cos, sin = self.tables(offset + T, x.device, x.dtype)
            return apply_rotary(x, cos[offset : offset + T], sin[offset : offset + T])
        positions = check_positions("positions", positions, x.shape[0], T)
        cos, sin = self.tables(int(positions.max()) + 1 if positions.numel() else 0, x.device, x.dtype)
        positions = positions.to(x.device)
        return apply_rotary(x, cos[positions], sin[positions])


def check_positions(name: str, positions: object, B: int, T: int) -> Tensor:
    """An integer tensor [T] or [B, T] of non-negative positions."""
    if not isinstance(positions, Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [T] or [B, T], got {type(positions).__name__}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != T or (positions.dim() == 2 and positions.shape[0] != B):
        raise ValueError(f"{name} must be [T={T}] or [B={B}, T={T}], got shape {tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"{name} must be non-negative")
    return positions.long()

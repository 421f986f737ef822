"""``CAREBlock``: CARE's decoupled dual-interactive linear attention as a token mixer (Zhou et al.,
CVPR 2025, arXiv 2411.16170). The branches are ``attnlab.mechanisms.care``; this module owns the
weights and the two interactions. What we chose where the paper is not specific (its code is not
public; spec §14):

* Split: ``la_ratio`` of the ``dim`` channels (default 0.5, rounded to a multiple of ``heads``) to
  linear attention (own q/k/v projection, elu+1 features), the rest to a depthwise conv with
  ``kernel_size`` (2-D over ``shape=(H, W)``, else 1-D over the sequence).
* Dual interaction, first half (local <-> global): a pointwise linear map over the concatenated
  branch outputs, so each output channel mixes both kinds of information.
* Dual interaction, second half (across layers): a pointwise linear map over the concatenation of
  that result and the dynamic memory ``Z`` handed over by the previous block (zeros for the first
  block). Its result is both the block's features (after the output projection) and the next
  block's ``Z``, so the memory is rewritten by every block ("dynamic").
* Residuals, norms and the MLP belong to the surrounding network and are left out.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from attnlab.core import positive_int
from attnlab.mechanisms import care, linear


class CAREOutput(NamedTuple):
    output: Tensor  # [B, N, dim]
    memory: Tensor  # [B, N, dim]: the dynamic memory Z for the next block


class CAREBlock(nn.Module):
    """x [B, N, dim] (and the previous block's memory [B, N, dim] or None) -> CAREOutput."""

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        *,
        la_ratio: float = 0.5,
        kernel_size: int = 3,
        shape: tuple[int, int] | None = None,
        causal: bool = False,
        chunk_size: int = linear.CHUNK_SIZE,
    ):
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        positive_int("kernel_size", kernel_size)
        if shape is not None and causal:
            raise ValueError("CAREBlock over a 2-D grid is bidirectional; use causal=False or shape=None")
        self.heads, self.shape, self.causal, self.chunk_size = heads, shape, causal, chunk_size
        self.attn_dim, self.conv_dim = care.split_channels(dim, heads, la_ratio)
        self.qkv = nn.Linear(self.attn_dim, 3 * self.attn_dim, bias=False)
        kernel = (kernel_size,) if shape is None else (kernel_size, kernel_size)
        w = torch.randn(self.conv_dim, 1, *kernel)  # host: parameter init; Module.to moves it
        self.conv_weight = nn.Parameter(w / math.prod(kernel) ** 0.5)
        self.mix = nn.Linear(dim, dim)  # interaction 1: local <-> global
        self.remember = nn.Linear(2 * dim, dim)  # interaction 2: with the memory of the previous block
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> CAREOutput:
        if x.dim() != 3 or x.shape[-1] != self.attn_dim + self.conv_dim:
            raise ValueError(f"x must be [B, N, dim={self.attn_dim + self.conv_dim}], got {tuple(x.shape)}")
        if memory is not None and memory.shape != x.shape:
            raise ValueError(f"memory must have x's shape {tuple(x.shape)}, got {tuple(memory.shape)}")
        B, N, _ = x.shape
        x_attn, x_conv = x.split([self.attn_dim, self.conv_dim], dim=-1)
        q, k, v = self.qkv(x_attn).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, d]
        glob, local = care.decoupled(
            q, k, v, x_conv, self.conv_weight, shape=self.shape, causal=self.causal, chunk_size=self.chunk_size
        )
        mixed = self.mix(torch.cat([glob, local], dim=-1))
        fused = self.remember(torch.cat([mixed, torch.zeros_like(mixed) if memory is None else memory], dim=-1))
        return CAREOutput(self.proj(fused), fused)

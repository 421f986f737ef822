"""CARE's asymmetric decoupling (Zhou et al., "CARE Transformer: Mobile-Friendly Linear Visual
Transformer via Decoupled Dual Interaction", CVPR 2025, arXiv 2411.16170), functional core.

The reading implemented (spec §14; the paper's code is not public, so the simplest faithful one):

* The block input's channels are split, ``x = [x_A | x_C]``: ``x_A`` (``la_ratio`` of the channels,
  default 0.5, rounded to a multiple of the heads) goes to linear attention for global context,
  ``x_C`` (the rest) to a depthwise convolution for local inductive bias. Neither branch sees the
  other's channels: that is the decoupling, and it is what saves compute over stacking conv and
  linear attention on all channels (MLLA).
* The global branch is ``linear`` attention with elu+1 features and the normalized rule
  ``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`` (spec §14, phi inferred), non-causal for images.
  It runs on attnlab's chunked linear core, so it is O(N) in time and memory.
* The local branch is a depthwise convolution over the token grid: 2-D over ``shape=(H, W)``
  (zero 'same' padding), or 1-D over the sequence when ``shape`` is None; a 1-D causal call pads on
  the left only, so the block can also run on causal sequences.
* The dual interaction and the dynamic memory unit need weights and live in ``attnlab.nn.CAREBlock``.

Not in the registry: the conv branch reads the block input's channels, not q, k, v, so CARE does
not fit the ``fn(q, k, v)`` contract. Its attention core is exactly the registered ``linear``
mechanism (``feature_map="elu+1"``), which ``attnlab check`` and the benchmark already cover.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnlab.mechanisms import linear


def split_channels(dim: int, heads: int, la_ratio: float) -> tuple[int, int]:
    """(attention channels, conv channels): ``la_ratio * dim`` rounded to a multiple of ``heads``,
    both branches non-empty."""
    if isinstance(la_ratio, bool) or not isinstance(la_ratio, (int, float)) or not 0.0 < la_ratio < 1.0:
        raise ValueError(f"la_ratio must be a float in (0, 1) (both branches non-empty), got {la_ratio!r}")
    attn = round(dim * la_ratio / heads) * heads
    if not 0 < attn < dim:
        raise ValueError(
            f"la_ratio={la_ratio} leaves no channels for one branch: dim={dim} split into multiples of heads={heads}"
        )
    return attn, dim - attn


def depthwise_conv(x: Tensor, weight: Tensor, *, shape=None, causal: bool = False) -> Tensor:
    """x [B, N, C] convolved per channel over the token grid -> [B, N, C].

    weight [C, 1, k] (1-D over the sequence, ``shape`` None) or [C, 1, kh, kw] (2-D over
    ``shape=(H, W)``, N = H * W). Zero 'same' padding; 1-D causal pads only the past."""
    B, N, C = x.shape
    if weight.dim() not in (3, 4) or weight.shape[:2] != (C, 1):
        raise ValueError(f"conv weight must be [C={C}, 1, k] or [C={C}, 1, kh, kw], got {tuple(weight.shape)}")
    if shape is None:
        if weight.dim() != 3:
            raise ValueError("a 1-D sequence (shape=None) needs a [C, 1, k] conv weight")
        kk = weight.shape[-1]
        pad = (kk - 1, 0) if causal else ((kk - 1) // 2, kk // 2)
        return F.conv1d(F.pad(x.transpose(1, 2), pad), weight, groups=C).transpose(1, 2)
    if causal:
        raise ValueError("CARE's 2-D conv branch is bidirectional (vision); call it with causal=False")
    if len(shape) != 2 or shape[0] * shape[1] != N or weight.dim() != 4:
        raise ValueError(f"shape must be (H, W) with H * W = N = {N} and a [C, 1, kh, kw] weight, got shape={shape}")
    kh, kw = weight.shape[-2:]
    grid = x.transpose(1, 2).reshape(B, C, *shape)
    grid = F.pad(grid, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2))
    return F.conv2d(grid, weight, groups=C).flatten(2).transpose(1, 2)


def decoupled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x_local: Tensor,
    conv_weight: Tensor,
    *,
    shape=None,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = linear.CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The two decoupled branches of a CARE block, before their interaction.

    q [B, H, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv]: the attention channels' projections;
    x_local [B, N, C_conv]: the conv channels; conv_weight as in :func:`depthwise_conv`.
    Returns (global [B, N, H * Dv], local [B, N, C_conv])."""
    if x_local.dim() != 3 or x_local.shape[:2] != (q.shape[0], q.shape[2]):
        raise ValueError(f"x_local must be [B, N, C] with B, N of q {tuple(q.shape)}, got {tuple(x_local.shape)}")
    glob = linear.chunked(q, k, v, causal=causal, scale=scale, feature_map="elu+1", chunk_size=chunk_size)
    glob = glob.transpose(1, 2).flatten(2)  # [B, H, N, Dv] -> [B, N, H*Dv]
    return glob, depthwise_conv(x_local, conv_weight, shape=shape, causal=causal)

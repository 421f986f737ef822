"""S2-Attention: sparsely-sharded attention (Lin et al., "S2-Attention: Hardware-Aware Context
Sharding Among Attention Heads", arXiv 2407.17678).

Each kv head h keeps, at the granularity of ``block_size`` blocks, its ``local_blocks`` most recent
blocks plus a vertical stripe of every ``vert_stride``-th block, shifted per head by
``h * head_step`` so that the heads together cover the whole context. The last ``dense_heads`` kv
heads are dense. With query position p = i + S - T (bottom-right), I = p // block_size and
J = j // block_size, head h allows key j when

    (|I - J| < local_blocks  or  (J + h * head_step) % vert_stride == 0)  and  (j <= p if causal)

Stripes use *absolute* block ids (the paper's rule): later tokens reuse the same vertical blocks,
so the pattern is KV-cache friendly. The spec's bidirectional variant measures stripes relative to
the band; we keep the absolute rule for non-causal calls too, so the union over heads still covers
everything (an ambiguity resolved in favour of the coverage property).

The default ``head_step`` is ``max(1, vert_stride // Hkv)``, with ``Hkv`` the *kv* heads: the stripe
pattern lives on kv heads (query heads of a group share it), so spreading the shifts over the kv
heads is what makes their union cover every block whenever ``Hkv >= vert_stride``. The authors'
kernel (DKernel, ``dkernel.utils.get_sparse_attn_mask``) divides by the number of *query* heads,
``max(1, vert_stride // H)`` (``int(vert_stride / num_heads)``), and shifts kv head h by
``h * head_step`` likewise. Under MHA the two agree; under GQA they differ (H=8, Hkv=2,
vert_stride=8: 4 here, 1 in DKernel). Pass ``head_step=max(1, vert_stride // H)`` to reproduce
DKernel exactly (its default ``head_sliding_offset=0``, dense heads last as here);
``tests/mechanisms/test_strided_shard.py`` checks it against DKernel's rule. [inferred: the paper
does not state the GQA case.]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.core import nonnegative_int, positive_int
from attnlab.kernels.layout import cached_layout, causal_blocks, layout_from_blocks, query_positions
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"block_size": 64, "local_blocks": 4, "vert_stride": 4, "head_step": None, "dense_heads": 0}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    out = {
        "block_size": positive_int("block_size", opts["block_size"]),
        "local_blocks": positive_int("local_blocks", opts["local_blocks"]),
        "vert_stride": positive_int("vert_stride", opts["vert_stride"]),
        "dense_heads": nonnegative_int("dense_heads", opts["dense_heads"]),
        "head_step": opts["head_step"],
    }
    if out["head_step"] is not None:
        nonnegative_int("head_step", out["head_step"])
    return out


def _head_step(head_step: int | None, vert_stride: int, kv_heads: int, dense_heads: int) -> int:
    """The stripe shift between heads; also where the kv head count is first known, so it is checked here."""
    if dense_heads > kv_heads:
        raise ValueError(f"dense_heads must be <= the kv heads {kv_heads}, got {dense_heads}")
    return max(1, vert_stride // kv_heads) if head_step is None else head_step


def _keep_blocks(I: Tensor, J: Tensor, h: Tensor, dense: Tensor, causal: bool, local: int, stride: int, step: int):
    near = (I - J < local) if causal else ((I - J).abs() < local)
    return near | ((J + h * step) % stride == 0) | dense


def _mask_mod(T, S, causal, block_size, local_blocks, vert_stride, step, first_dense):
    off = S - T

    def strided_shard(b, h, q_idx, kv_idx):
        p = q_idx + off
        keep = _keep_blocks(
            p // block_size, kv_idx // block_size, h, h >= first_dense, causal, local_blocks, vert_stride, step
        )
        return keep & (kv_idx <= p) & (p >= 0) if causal else keep & (p >= 0)

    return strided_shard


def mask(
    T: int, S: int, *, causal: bool, kv_heads: int, block_size, local_blocks, vert_stride, head_step, dense_heads
) -> Tensor:
    """bool [1, kv_heads, T, S]: one pattern per kv head (query heads of a group share it)."""
    step = _head_step(head_step, vert_stride, kv_heads, dense_heads)
    p = (torch.arange(T) + S - T).view(1, T, 1)  # host: dense oracle mask
    j = torch.arange(S).view(1, 1, S)  # host: dense oracle mask
    h = torch.arange(kv_heads).view(-1, 1, 1)  # host: dense oracle mask
    keep = _keep_blocks(
        p // block_size, j // block_size, h, h >= kv_heads - dense_heads, causal, local_blocks, vert_stride, step
    )
    keep = keep & (p >= 0)
    return (keep & (j <= p) if causal else keep).unsqueeze(0)


@cached_layout
def layout(
    T: int,
    S: int,
    *,
    causal: bool,
    block: tuple[int, int],
    kv_heads: int,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    head_step: int | None,
    dense_heads: int,
):
    """The per-kv-head block layout [1, kv_heads, nQB, V], decided at block level: its tiles are
    ``block_size`` (the pattern's own blocks), whatever the device's ``block``."""
    beta = block_size
    step = _head_step(head_step, vert_stride, kv_heads, dense_heads)
    nKB = math.ceil(S / beta)
    p0, p1 = query_positions(T, S, beta)
    # A query block spans position blocks I0..I1 (two when S - T is not a multiple of beta).
    I0, I1 = (p0.clamp(min=0) // beta).view(1, -1, 1), (p1.clamp(min=0) // beta).view(1, -1, 1)
    J = torch.arange(nKB).view(1, 1, -1)  # host: layout planning
    h = torch.arange(kv_heads).view(-1, 1, 1)  # host: layout planning
    dense = h >= kv_heads - dense_heads
    k0, k1 = (_keep_blocks(I, J, h, dense, causal, local_blocks, vert_stride, step) for I in (I0, I1))
    some, every = causal_blocks(T, S, beta, causal)
    visited, full = (k0 | k1) & some, k0 & k1 & every
    mod = _mask_mod(T, S, causal, beta, local_blocks, vert_stride, step, kv_heads - dense_heads)
    return layout_from_blocks(visited.unsqueeze(0), full.unsqueeze(0), T, S, (beta, beta), mod)


SPEC = Mechanism(
    "strided_shard",
    "S2-Attention, arXiv 2407.17678",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    example=lambda S: {"block_size": 4, "local_blocks": 2, "vert_stride": 3},
    workloads=Workloads(quality=lambda L: {"block_size": max(1, L // 16), "local_blocks": 2, "vert_stride": 4}),
    per_kv_head=True,
    mask=mask,
    layout=layout,
)

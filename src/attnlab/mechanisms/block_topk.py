"""Block top-k sparse attention in the style of InfLLM-V2 (MiniCPM Team, "MiniCPM4", arXiv
2506.07900; used by MiniCPM-SALA, arXiv 2602.11761) and the COMPUTE layers of HyLRA (arXiv 2602.00777).

Selection, per batch, kv head and query block of ``block_size`` rows (shared by the query heads of a
GQA group):

  q̄_n  = mean of the block's queries over rows and the group's heads        [B, Hkv, nQB, D]
  K̃_m  = mean of key block m                                                [B, Hkv, nKB, D]
  s[n, m] = scale * q̄_n · K̃_m          (visible blocks only: causal => block starts <= the block's
                                         last query position)
  keep the first ``init_blocks`` blocks and the ``local_blocks`` most recent ones, then fill the
  budget of ``top_k`` blocks in all by score; ties go to the more recent block (spec §0).

Attention then runs over the selected blocks with the token-level causal mask. Resolutions of the
spec's ambiguities: the selection unit is the query block (not the token), pooling is a plain mean
of non-overlapping blocks (the released kernels use overlapping windows of 32 with stride 16 and a
max-pool, a refinement of the same idea), and the budget counts the forced blocks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from attnlab.core import AttentionOutput, nonnegative_int, positive_int, resolve_scale
from attnlab.kernels import BlockLayout, block_sparse_attention
from attnlab.kernels.layout import causal_blocks, layout_from_blocks, query_positions
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"block_size": 64, "top_k": 16, "init_blocks": 1, "local_blocks": 4}


class BlockSelection(NamedTuple):
    """What was kept: ``blocks`` bool [B, Hkv, nQB, nKB] and the executor layout built from it."""

    blocks: Tensor
    layout: BlockLayout
    causal: bool

    def dense_mask(self) -> Tensor:
        """The equivalent token mask [B, Hkv, T, S], for the oracle and for analysis."""
        lay, dev = self.layout, self.blocks.device
        rows = torch.arange(lay.T, device=dev) // lay.block_q
        cols = torch.arange(lay.S, device=dev) // lay.block_k
        allowed = self.blocks[:, :, rows][..., cols]
        p = (torch.arange(lay.T, device=dev) + lay.S - lay.T).view(-1, 1)
        if self.causal:
            allowed = allowed & (torch.arange(lay.S, device=dev).view(1, -1) <= p)
        return allowed & (p >= 0)


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    out = {
        "block_size": positive_int("block_size", opts["block_size"]),
        "top_k": positive_int("top_k", opts["top_k"]),
        "init_blocks": nonnegative_int("init_blocks", opts["init_blocks"]),
        "local_blocks": nonnegative_int("local_blocks", opts["local_blocks"]),
    }
    if out["init_blocks"] + out["local_blocks"] > out["top_k"]:
        raise ValueError(f"top_k (the whole budget) must be >= init_blocks + local_blocks, got {out}")
    return out


def _pool(x: Tensor, block: int) -> Tensor:
    """Mean over blocks of the sequence axis: [B, h, L, D] -> [B, h, ceil(L / block), D]."""
    n = math.ceil(x.shape[2] / block)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - x.shape[2])).unflatten(2, (n, block)).sum(3)
    counts = torch.clamp(x.shape[2] - torch.arange(n, device=x.device) * block, max=block).view(1, 1, n, 1)
    return sums / counts


def _rank_by_score(score: Tensor) -> Tensor:
    """Block indices by score descending, ties to the higher (more recent) index: a stable sort of
    the reversed row."""
    n = score.shape[-1]
    order = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    return n - 1 - order


@torch.no_grad()
def select(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 64,
    top_k: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 4,
    **_,
) -> BlockSelection:
    """Score key blocks per query block and keep the budget; no gradient flows through the choice.

    A few batched ops on q's device, with no host sync: the layout's width is known from the shapes.
    """
    B, H, T, D = q.shape
    Hkv, S, dev = k.shape[1], k.shape[2], q.device
    beta, off = block_size, S - T
    nQB, nKB = math.ceil(T / beta), math.ceil(S / beta)
    q_bar = _pool(q, beta).view(B, Hkv, H // Hkv, nQB, D).mean(2)  # [B, Hkv, nQB, D]
    k_bar = _pool(k, beta)  # [B, Hkv, nKB, D]
    score = resolve_scale(scale, D) * q_bar @ k_bar.transpose(-1, -2)  # [B, Hkv, nQB, nKB]

    first, last_pos = query_positions(T, S, beta, device=dev)
    J = torch.arange(nKB, device=dev).view(1, -1)
    visible, every = causal_blocks(T, S, beta, causal, device=dev)
    own = last_pos if causal else first  # the query block's own key block
    last = (own.clamp(min=0) // beta).view(-1, 1)
    forced = visible & ((J < init_blocks) | ((last - J).abs() < local_blocks) & ((J <= last) | (not causal)))
    rank_score = torch.where(forced, float("inf"), torch.where(visible, score, float("-inf")))
    order = _rank_by_score(rank_score)[..., :top_k]  # forced first, then by score
    keep = torch.zeros(B, Hkv, nQB, nKB, dtype=torch.bool, device=dev).scatter_(-1, order, True) & visible
    full = keep & every

    def block_topk(b, h, q_idx, kv_idx):
        p = q_idx + off
        return (kv_idx <= p) & (p >= 0) if causal else p >= 0

    # The last query row sits at key S - 1 and sees every key block (causal or not), and visible blocks
    # rank above invisible ones: the widest query block keeps exactly min(top_k, nKB) blocks.
    width = min(top_k, nKB) if T and S else 0
    layout = layout_from_blocks(keep, full, T, S, (beta, beta), block_topk, selected=True, width=width)
    return BlockSelection(keep, layout, causal)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size=64,
    top_k=16,
    init_blocks=1,
    local_blocks=4,
    selection: BlockSelection | None = None,
) -> AttentionOutput:
    if selection is None:
        selection = select(
            q,
            k,
            causal=causal,
            scale=scale,
            block_size=block_size,
            top_k=top_k,
            init_blocks=init_blocks,
            local_blocks=local_blocks,
        )
    return block_sparse_attention(q, k, v, selection.layout, scale=scale)


SPEC = Mechanism(
    "block_topk",
    "InfLLM-V2 (MiniCPM4, arXiv 2506.07900); HyLRA, arXiv 2602.00777",
    Kind.SELECTION,
    {"blocksparse": Impl(attention)},
    check_options,
    DEFAULTS,
    example=lambda S: {"block_size": 4, "top_k": 3, "init_blocks": 1, "local_blocks": 1},
    workloads=Workloads(
        quality=lambda L: {"block_size": max(1, L // 16), "top_k": 3, "init_blocks": 1, "local_blocks": 1}
    ),
    select=select,
    selection_type=BlockSelection,
)

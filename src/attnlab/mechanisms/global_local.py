"""Global-local mixture attention, after UltraGen's hierarchical attention (Hu et al., arXiv
2510.18775): a local branch at full resolution plus a global branch over spatially compressed
(average-pooled) keys and values, mixed by a gate:

    out = gate * local + (1 - gate) * global

* local: 1-D sequences use a sliding window (``window``); grids (``shape=(H, W)`` or ``(T, H, W)``)
  use neighbourhood attention with ``kernel_size`` (UltraGen partitions frames into windows; the
  NATTEN window is the overlapping generalization and keeps every query at the window's centre).
* global: keys and values average-pooled by ``pool`` per axis (the last pool may be partial), one
  softmax over the pooled tokens. Causal 1-D calls see a pooled token only once all ``pool`` of its
  members are in the past (position p sees pooled block m when (m + 1) * pool - 1 <= p). A trailing
  partial block is therefore seen by no query: its average would change as the sequence grows, and a
  KV-cache decode step must see exactly what a full recompute sees.
* gate: a float in [0, 1] or a tensor broadcastable to [B, H, T, 1] (per head, per token); learn it
  in a module and pass it in. 0.5 by default.

UltraGen's global branch also runs depthwise convolutions and LoRA projections before attention;
those belong to a layer and are left to the caller, as are its resize steps (we pool exactly).

No log-sum-exp (``has_lse=False``; ``attention_lse`` refuses the mechanism). Each branch is one
softmax with its own LSE (l_loc, l_glob), but the mix is not one softmax: written as a softmax over
both key sets it would weight the local keys by g e^{-l_loc} and the pooled ones by (1 - g) e^{-l_glob},
constants that depend on every key of each branch. Partial results over key shards therefore merge
branch by branch, with two LSEs per row; no single LSE can merge the mixed outputs.
:func:`branches` returns both branches with their LSEs, for callers that merge them so.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, int_tuple, positive_int
from attnlab.kernels import block_sizes, block_sparse_attention, build_layout
from attnlab.kernels.layout import query_positions
from attnlab.mechanisms import dense, neighborhood, sliding_window
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"shape": None, "window": 256, "kernel_size": 7, "pool": 8, "gate": 0.5}


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    out = dict(opts)
    shape = opts["shape"]
    if shape is None:
        out["pool"] = positive_int("pool", opts["pool"])
        out["window"] = positive_int("window", opts["window"])
    else:
        if causal:
            raise ValueError("global_local over a grid is bidirectional (UltraGen); call it with causal=False")
        local = {"shape": shape, "kernel_size": opts["kernel_size"], "dilation": 1}
        nb = neighborhood.check_options(T, S, False, local)
        out["shape"], out["kernel_size"] = nb["shape"], nb["kernel_size"]
        out["pool"] = int_tuple("pool", opts["pool"], len(nb["shape"]))
    gate = opts["gate"]
    if isinstance(gate, Tensor):
        if gate.dim() > 4:
            raise ValueError(f"gate must broadcast to [B, H, T, 1], got shape {tuple(gate.shape)}")
    elif isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 <= gate <= 1.0:
        raise ValueError(f"gate must be a float in [0, 1] or a tensor, got {gate!r}")
    return out


def pool_kv(x: Tensor, shape, pool) -> Tensor:
    """Average-pool the sequence axis of x [B, h, S, E]: by ``pool`` tokens (1-D) or by a per-axis
    window over the grid ``shape`` (partial edge windows average what they hold)."""
    B, h, S, E = x.shape
    if shape is None:
        n = math.ceil(S / pool)
        sums = F.pad(x, (0, 0, 0, n * pool - S)).unflatten(2, (n, pool)).sum(3)
        counts = torch.clamp(S - torch.arange(n, device=x.device) * pool, max=pool).view(1, 1, n, 1)
        return sums / counts.to(x.dtype)
    grid = x.permute(0, 1, 3, 2).reshape(B * h, E, *shape)
    pooler = F.avg_pool2d if len(shape) == 2 else (F.avg_pool3d if len(shape) == 3 else F.avg_pool1d)
    pooled = pooler(grid, pool, pool, ceil_mode=True, count_include_pad=False)
    return pooled.reshape(B, h, E, -1).permute(0, 1, 3, 2)


def _global_mask_mod(T: int, S: int, pool: int):
    off = S - T

    def global_causal(b, h, q_idx, kv_idx):  # kv_idx indexes pooled tokens
        return (kv_idx + 1) * pool - 1 <= q_idx + off  # complete blocks only (see the module doc)

    return global_causal


@functools.lru_cache(maxsize=64)
def _global_layout(T: int, S: int, pool: int, block: tuple[int, int]):
    n = math.ceil(S / pool)
    _, last = query_positions(T, S, block[0])
    hi = torch.clamp((last + 1) // pool + 1, max=n)
    return build_layout(_global_mask_mod(T, S, pool), T, n, key_ranges=[(torch.zeros_like(hi), hi)], block=block)


def _global_mask(T: int, S: int, pool: int) -> Tensor:
    n = math.ceil(S / pool)
    last_member = (torch.arange(n) + 1) * pool - 1  # host: dense oracle mask
    return last_member.view(1, n) <= (torch.arange(T) + S - T).view(T, 1)  # host: dense oracle mask


def _grid(shape, kernel_size) -> dict:
    """The local branch's neighborhood options (``shape`` and ``kernel_size`` already checked)."""
    return {"shape": shape, "kernel_size": kernel_size, "dilation": (1,) * len(shape)}


def _gate(gate, like: Tensor):
    return gate.to(like.dtype) if isinstance(gate, Tensor) else gate


def _branches(q, k, v, causal, scale, shape, window, kernel_size, pool, need_lse: bool):
    """(local, global) AttentionOutputs; the global LSE is None when not ``need_lse`` and non-causal."""
    if shape is None:
        local = sliding_window.SPEC.blocksparse(q, k, v, causal=causal, scale=scale, window=window)
    else:
        local = neighborhood.SPEC.blocksparse(q, k, v, causal=False, scale=scale, **_grid(shape, kernel_size))
    kp, vp = pool_kv(k, shape, pool), pool_kv(v, shape, pool)  # [B, Hkv, n, D], [B, Hkv, n, Dv]
    if causal:
        lay = _global_layout(q.shape[2], k.shape[2], pool, block_sizes(q.device))
        glob = block_sparse_attention(q, kp, vp, lay, scale=scale)
    elif need_lse:  # the executor gives an LSE on every device; public SDPA only on the CPU
        glob = dense.blocksparse(q, kp, vp, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, kp, vp, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        glob = AttentionOutput(out, None)
    return local, glob


def branches(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, **options
) -> tuple[AttentionOutput, AttentionOutput]:
    """The two softmax branches apart, each (out [B, H, T, Dv], lse [B, H, T]): local over the
    window (or grid neighbourhood) keys, global over the pooled keys. ``attention`` returns
    ``gate * local.out + (1 - gate) * global.out``; each branch merges over key shards by its own
    LSE (the module docstring says why the mix has none). Options as ``attnlab.attention``'s."""
    check_qkv(q, k, v)
    opts = SPEC.resolve(q.shape[2], k.shape[2], causal, options)
    opts.pop("gate")
    return _branches(q, k, v, causal, scale, need_lse=True, **opts)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    shape=None,
    window: int = 256,
    kernel_size=7,
    pool=8,
    gate=0.5,
) -> AttentionOutput:
    local, glob = _branches(q, k, v, causal, scale, shape, window, kernel_size, pool, need_lse=False)
    g = _gate(gate, local.out)
    return AttentionOutput(g * local.out + (1 - g) * glob.out, None)


def oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale=None,
    shape=None,
    window=256,
    kernel_size=7,
    pool=8,
    gate=0.5,
) -> _reference.Reference:
    """Two dense oracles, one per branch, mixed by the gate (no single softmax, so no LSE)."""
    T, S = q.shape[2], k.shape[2]
    if shape is None:
        local_mask = sliding_window.mask(T, S, causal=causal, window=window)
    else:
        local_mask = neighborhood.mask(T, S, causal=False, **_grid(shape, kernel_size))
    local = _reference.attention(q, k, v, local_mask, scale=scale).out
    kp, vp = pool_kv(k, shape, pool), pool_kv(v, shape, pool)
    global_mask = _global_mask(T, S, pool) if causal else None
    glob = _reference.attention(q, kp, vp, global_mask, scale=scale).out
    g = _gate(gate, local)
    return _reference.Reference(g * local + (1 - g) * glob, None, None)


SPEC = Mechanism(
    "global_local",
    "UltraGen hierarchical attention, arXiv 2510.18775",
    Kind.COMPOSITE,  # no single mask: the oracle mixes two dense attentions
    {"composite": Impl(attention)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="two softmaxes (window keys, pooled keys) mixed by a gate: each branch has an LSE, the mix none",
    example=lambda S: {"window": 5, "pool": 3, "gate": 0.3},
    workloads=Workloads(quality=lambda L: {"window": L // 4, "pool": 8}, reach="window"),
    oracle=oracle,
)

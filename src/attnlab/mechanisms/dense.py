"""Dense softmax attention (Vaswani et al., "Attention Is All You Need", 2017).

Fast paths: PyTorch's fused SDPA kernel where it can run the call, and the block-sparse executor
(the record's generic ``blocksparse`` impl) for the pattern it cannot (causal cross-attention, which
SDPA aligns top-left, not bottom-right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import AttentionOutput, equal_head_dims, repeat_kv, resolve_scale
from attnlab.kernels import build_layout
from attnlab.kernels.cpu import cpu_flash
from attnlab.kernels.layout import cached_layout, query_positions
from attnlab.spec import Impl, Kind, Mechanism


def mask(T: int, S: int, *, causal: bool) -> Tensor:
    """bool [T, S]; causal is bottom-right aligned."""
    if not causal:
        return torch.ones(T, S, dtype=torch.bool)  # host: dense oracle mask, moved by the caller
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)  # host: dense oracle mask, moved by the caller


def sdpa_supports(q: Tensor, k: Tensor, v: Tensor, causal: bool, need_lse: bool = False, **_) -> str | None:
    if causal and q.shape[2] != k.shape[2]:
        return "SDPA aligns causal masks top-left; bottom-right causal cross-attention needs the executor"
    if need_lse and q.device.type != "cpu":
        return "public SDPA returns no log-sum-exp off CPU"
    return None


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None) -> AttentionOutput:
    """PyTorch's fused kernel; on CPU the flash op also hands back the LSE at no extra cost."""
    scale = resolve_scale(scale, q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    if q.device.type != "cpu":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)
        return AttentionOutput(out, None)
    if q.shape[2] == 0 or k.shape[2] == 0:
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return AttentionOutput(q.new_zeros(*q.shape[:3], v.shape[-1]), lse)
    q_, k_, v_ = equal_head_dims(q, k, v)
    out, lse = cpu_flash(q_, repeat_kv(k_, groups), repeat_kv(v_, groups), 0.0, causal, scale=scale)
    return AttentionOutput(
        out[..., : v.shape[-1]], lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    )


def _mask_mod(offset: int):
    def causal_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return causal_mod


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int]):
    if not causal:
        return build_layout(lambda b, h, qi, ki: torch.ones_like(qi + ki, dtype=torch.bool), T, S, block=block)
    _, last = query_positions(T, S, block[0])
    ranges = [(torch.zeros_like(last), last + 1)]
    return build_layout(_mask_mod(S - T), T, S, key_ranges=ranges, block=block)


SPEC = Mechanism(
    "dense",
    "Vaswani et al. 2017, arXiv 1706.03762",
    Kind.MASK,
    {"sdpa": Impl(sdpa, sdpa_supports, traced=True)},  # then the record's blocksparse
    lambda T, S, causal, o: {},
    mask=mask,
    layout=layout,
)

blocksparse = SPEC.blocksparse  # dense attention on the executor, for mechanisms built on it

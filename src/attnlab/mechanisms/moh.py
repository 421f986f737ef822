"""The functional core of Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, "MoH: Multi-Head
Attention as Mixture-of-Head Attention", arXiv 2410.11842): per-head attention outputs weighted by a
gate per (token, head),

    out[b, h, t] = gates[b, h, t] * softmax(s q_t K_g(h)^T + causal mask) V_g(h)

MoH's layer output is ``W_O`` applied to this (``y_t = Σ_h g[h] O_h(t) W_O^h``), so the routing, the
top-k and the gate constants live in ``attnlab.nn.MoHAttention``, which computes the gates and
passes them here. ``gates`` is None (every gate 1: exactly dense attention) or a tensor that
broadcasts to [B, H, T, 1], the layout of global_local's gate. A gate of exactly 0 (a routed head
a token did not select) gives an exact 0 for that row, whatever the attention row holds (spec
§1.7: inactive heads are computed then zeroed, never NaN * 0).

LSE: ``attention_lse`` returns the log-sum-exp of the underlying softmax, gates left out. That is
the quantity partial results merge by: over disjoint key sets A and B with partial softmax outputs
O_A, O_B and LSEs l_A, l_B, the full row is O = e^{l_A - l} O_A + e^{l_B - l} O_B with
l = log(e^{l_A} + e^{l_B}), and the gate g of a (token, head) row is one constant for both parts, so

    g O = e^{l_A - l} (g O_A) + e^{l_B - l} (g O_B):

gated partials merged by the softmax's LSE are the gated merge (``core.merge_lse``; tested in
tests/mechanisms/test_moh.py). A gate of 0 keeps the row's finite LSE and an exactly-0 output.

The fast path is the dense one (SDPA; the executor for bottom-right causal cross attention) plus
the gate: skipping single inactive (token, head) rows would cost a gather larger than the work it
saves on CPU. Off the CPU public SDPA returns no LSE, so ``attention_lse`` there takes the
``blocksparse`` impl (the executor; FlexAttention on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, compute_dtype, repeat_kv
from attnlab.mechanisms import dense
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"gates": None}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    gates = opts["gates"]
    if gates is None:
        return {"gates": None}
    if not isinstance(gates, Tensor) or not gates.dtype.is_floating_point:
        raise ValueError(f"gates must be None or a floating tensor broadcastable to [B, H, T, 1], got {gates!r}")
    shape = tuple(gates.shape)
    if len(shape) > 4 or (shape and shape[-1] != 1) or (len(shape) >= 2 and shape[-2] not in (1, T)):
        raise ValueError(f"gates must broadcast to [B, H, T={T}, 1] (last axis 1), got shape {tuple(gates.shape)}")
    return {"gates": gates}


def _broadcastable(gates: Tensor, out: Tensor, dtype: torch.dtype) -> Tensor:
    """gates on out's device in ``dtype``, once they are known to broadcast to [B, H, T, 1]."""
    target = (*out.shape[:3], 1)
    try:
        torch.broadcast_shapes(gates.shape, target)
    except RuntimeError:
        got = tuple(gates.shape)
        raise ValueError(f"gates must broadcast to [B, H, T, 1]={list(target)}, got shape {got}") from None
    return gates.to(out.device, dtype)


def gate_heads(out: Tensor, gates: Tensor) -> Tensor:
    """out [B, H, T, Dv] times gates (-> [B, H, T, 1]); rows whose gate is exactly 0 are exactly 0."""
    g = _broadcastable(gates, out, out.dtype)
    return torch.where(g != 0, out * g, torch.zeros((), dtype=out.dtype, device=out.device))


def _gated(res: AttentionOutput, gates: Tensor | None) -> AttentionOutput:
    """The softmax rows gated; the LSE is the softmax's own (module docstring)."""
    return AttentionOutput(res.out if gates is None else gate_heads(res.out, gates), res.lse)


def sdpa_supports(q: Tensor, k: Tensor, v: Tensor, causal: bool, need_lse: bool = False, **_) -> str | None:
    if need_lse and q.device.type != "cpu":
        return "public SDPA returns no log-sum-exp off CPU"
    return None


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, gates: Tensor | None = None
) -> AttentionOutput:
    """out [B, H, T, Dv], lse [B, H, T] (None off the CPU, where ``sdpa_supports`` refuses need_lse)."""
    if dense.sdpa_supports(q, k, v, causal) is None:
        return _gated(dense.sdpa(q, k, v, causal=causal, scale=scale), gates)
    return _gated(dense.blocksparse(q, k, v, causal=causal, scale=scale), gates)


def blocksparse(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, gates: Tensor | None = None
) -> AttentionOutput:
    """The executor's dense layout, gated: an LSE on every device."""
    return _gated(dense.blocksparse(q, k, v, causal=causal, scale=scale), gates)


def oracle(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, gates: Tensor | None = None
) -> _reference.Reference:
    """The dense oracle's rows scaled by the gates (weights scaled alike); the LSE is the softmax's."""
    ref = _reference.attention(q, k, v, causal=causal, scale=scale)
    if gates is None:
        return ref
    ct = compute_dtype(q.dtype)
    weights = ref.weights * _broadcastable(gates, ref.out, ct)  # [B, H, T, S]
    out = torch.einsum("bhts,bhsd->bhtd", weights, repeat_kv(v.to(ct), q.shape[1] // k.shape[1]))
    return _reference.Reference(out.to(q.dtype), weights, ref.lse)


def _quarter_off_gates(T: int) -> dict:
    """Per-token gates, a quarter exactly 0 (routed-off rows); [T, 1] fits any head count."""
    g = torch.rand(T, 1, generator=torch.Generator().manual_seed(T)) * 2  # host: workload option
    return {"gates": torch.where(torch.arange(T).view(T, 1) % 4 == 3, 0.0, g)}  # host: workload option


SPEC = Mechanism(
    "moh",
    "MoH (mixture-of-head attention), arXiv 2410.11842: gated heads; the layer is nn.MoHAttention",
    Kind.COMPOSITE,  # dense attention rows scaled by per-(token, head) gates
    {"sdpa": Impl(attention, sdpa_supports, traced=True), "blocksparse": Impl(blocksparse)},
    check_options,
    DEFAULTS,
    # per-token gates need T: tests/mechanisms/test_moh.py
    example=lambda S: {"gates": torch.full((1, 1, 1, 1), 0.75)},  # host: example option
    workloads=Workloads(
        efficiency=_quarter_off_gates,
        heads=4,
        untrainable="routed heads need nn.MoHAttention's gate network; the bare mechanism takes fixed gates",
    ),
    oracle=oracle,
)

"""The linear family on CUDA through flash-linear-attention's Triton kernels (fla-core; Yang, Zhang
et al., github.com/fla-org/flash-linear-attention), an optional extra: ``pip install attnlab[cuda]``.

fla's conventions (fla-core 0.6.0), read from its source:

* ``fla/ops/linear_attn/chunk.py`` ``chunk_linear_attn(q, k, v, scale, initial_state,
  output_final_state, normalize, cu_seqlens)``: q, k [B, T, H, K], v [B, T, H, V] (time before
  heads; ``head_first`` is gone), one length T for queries and keys, causal only, the current token
  included, no feature map (callers apply theirs): ``o_t = scale * q_t @ sum_{j<=t} k_j^T v_j``.
  It is ``chunk_simple_gla`` without a gate. ``normalize=True`` divides by
  ``scale * q_t . sum_{j<=t} k_j + 1e-10`` (``fla/ops/linear_attn/utils.py``).
* ``fla/ops/simple_gla/chunk.py`` ``chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale, ...)``:
  ``g_gamma`` [H] is a per-head log decay per step, ``S_t = exp(g_gamma_h) S_{t-1} + k_t^T v_t``,
  ``o_t = scale * q_t S_t``; no gradient reaches it. ``initial_state`` [B, H, K, V] gets one.
* q and k share one head count; v may have more ("GVA"), the opposite of our GQA, so kv heads are
  repeated here. The output is in q.dtype; tiles accumulate in fp32, but fp32 inputs meet
  ``tl.dot``, which on Ampere and later GPUs rounds them to TF32 unless ``TRITON_F32_DEFAULT=ieee``.
  The forward stores the per-chunk states in the input dtype (``states_in_fp32=False`` in
  ``chunk_simple_gla_fwd``), so fp16/bf16 results carry the states' rounding (RMS error ~0.3-1
  eps of the dtype, measured under the interpreter in fp16) where the torch path rounds once.
  The chunk size (64) is fla's own: our ``chunk_size`` tunes the torch path only.

The mapping, so the result is the oracle's (mechanisms/linear.py) to rounding:

* We apply the feature map, pass ``scale`` through, and take only fla's numerator
  (``normalize=False``). For normalized maps the denominator ``scale * phi(q_t) . sum_j phi(k_j)``
  is a cumulative sum computed here, in fp32, and clamped at ``EPS`` as everywhere in attnlab: fla's
  ``+ 1e-10`` differs from the clamp where a row's denominator is below EPS (relu rows that barely
  see a key), so its ``normalize=True`` is not our convention.
* Causal cross attention (bottom-right): keys before the first query fold into fla's initial state
  (``linear_chunks.prefix_state``, torch, O(P D Dv)); queries before key 0 see nothing and output 0.
* Non-causal calls, non-CUDA tensors, fp64, empty sequences and (unless allowed, above) fp32 are
  declined with a one-line reason, and impl="auto" runs the torch chunked path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.kernels import linear_chunks

# The devices fla's kernels serve. Tests add "cpu" when Triton's interpreter runs the kernels.
DEVICES = ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _import() -> tuple[object, object] | str:
    """fla's two entry points, or why they cannot be imported."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # ImportError, or triton failing to initialise
        return f"{type(e).__name__}: {e}"
    return chunk_linear_attn, chunk_simple_gla


def available() -> bool:
    """Whether fla-core imports (checked once per process)."""
    return not isinstance(_import(), str)


def fp32_reason() -> str | None:
    """fp32 inputs run on fla only where its TF32 dots are exact or accepted."""
    if os.environ.get("TRITON_F32_DEFAULT", "").lower() == "ieee" or torch.backends.cuda.matmul.allow_tf32:
        return None
    return (
        "fla's fp32 dots are TF32 on this GPU; set TRITON_F32_DEFAULT=ieee "
        "or torch.backends.cuda.matmul.allow_tf32 = True to run fp32 on fla"
    )


def supports(q: Tensor, k: Tensor, v: Tensor, causal) -> str | None:
    """None when fla's chunk kernels can run this call, else the one-line reason. The cheap checks
    come first, so a CPU call never imports fla (and Triton)."""
    if not causal:
        return "fla's chunk kernels are causal only; non-causal runs the torch chunked path"
    if q.device.type not in DEVICES:
        return f"fla's Triton kernels need a CUDA device, got {q.device.type}"
    if q.dtype not in DTYPES:
        return f"fla's kernels take fp16, bf16 or fp32, got {str(q.dtype).removeprefix('torch.')}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    if not available():
        return f"flash-linear-attention (fla-core) does not import; pip install 'attnlab[cuda]': {_import()}"
    if q.dtype == torch.float32 and q.device.type == "cuda":
        return fp32_reason()
    return None


# -- the mapped call -----------------------------------------------------------------------------


def _to_fla(x: Tensor, phi, dtype: torch.dtype) -> Tensor:
    """[B, H, L, E] -> phi(x) [B, L, H, E] contiguous in ``dtype`` (features rounded once)."""
    x = x.transpose(1, 2)
    if phi is None:
        return x.to(dtype).contiguous()
    return phi(x.to(torch.float32)).to(dtype).contiguous()


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """[B, L, Hkv, E] -> [B, L, Hkv*groups, E]: query head i reads kv head i // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _denominator(qf: Tensor, kf: Tensor, scale: float, P: int) -> Tensor:
    """scale * phi(q_t) . sum_{j <= p_t} phi(k_j) in fp32: qf [B, T', H, F] (the queries that see a
    key), kf [B, S, Hkv, F] (every key) -> [B, T', H]. Query t' sits at key position P + t'."""
    B, T, H, Fd = qf.shape
    Hkv = kf.shape[2]
    kcum = kf.float().cumsum(1)[:, P:]  # [B, T', Hkv, F]: keys up to each query's position
    den = qf.float().view(B, T, Hkv, H // Hkv, Fd) * kcum.unsqueeze(3)
    return den.sum(-1).view(B, T, H) * scale


def causal(
    q: Tensor, k: Tensor, v: Tensor, feats: linear_chunks.Features, log_g: Tensor | None, *, identity: bool = False
) -> Tensor:
    """Causal (decayed) linear attention on fla: q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] ->
    [B,H,T,Dv] in q.dtype (a transposed view of fla's [B,T,H,Dv] output). ``feats`` as for the torch
    path (phi, scale, groups, normalized); ``log_g`` [H] log decays or None; ``identity`` says phi
    is the identity (q and k then go to fla as they are, with no fp32 round trip)."""
    chunk_linear_attn, chunk_simple_gla = _import()
    T, S, dtype = q.shape[2], k.shape[2], q.dtype
    lo = max(0, T - S)  # queries before key 0: no key, output 0
    P = max(0, S - T)  # keys before the first query: fla's initial state
    phi = None if identity else feats.phi
    qf = _to_fla(q[:, :, lo:], phi, dtype)  # [B, T-lo, H, F]
    kf = _to_fla(k, phi, dtype)  # [B, S, Hkv, F]
    vf = _to_fla(v[:, :, P:], None, dtype)  # [B, S-P, Hkv, Dv]
    h0 = linear_chunks.prefix_state(k, v, feats, log_g, P)[0] if P else None  # [B, H, F, Dv] fp32
    k_in, v_in = _repeat_heads(kf[:, P:], feats.groups), _repeat_heads(vf, feats.groups)
    if log_g is None:
        o, _ = chunk_linear_attn(qf, k_in, v_in, scale=feats.scale, initial_state=h0, normalize=False)
    else:
        g_gamma = log_g.to(device=q.device, dtype=torch.float32)
        o, _ = chunk_simple_gla(qf, k_in, v_in, g_gamma=g_gamma, scale=feats.scale, initial_state=h0)
    if feats.normalized:
        den = _denominator(qf, kf, feats.scale, P)
        o = (o.float() / den.clamp_min(linear_chunks.EPS).unsqueeze(-1)).to(dtype)
    if lo:
        o = F.pad(o, (0, 0, 0, 0, lo, 0))  # [B, T, H, Dv]
    return o.transpose(1, 2)

"""Differential attention and its grouped form.

* DIFF Transformer (Ye et al., "Differential Transformer", arXiv 2410.05258): each head subtracts a
  second softmax map, scaled by λ, from a first one, cancelling attention noise common to both:

      out_i = (softmax(Q1_i K1_iᵀ · s) − λ_i · softmax(Q2_i K2_iᵀ · s)) V_i,   s = 1/√d

* GDA (Lim et al., "Grouped Differential Attention", arXiv 2510.06949): signal heads outnumber
  noise heads G:1, and each noise map is shared by the G consecutive signal heads of its group:

      out_i = A1_i V_kv(i) − λ_i · A2_⌊i/G⌋ V_kv(i)

How q, k, v carry the two maps (our layout, the contract's shapes kept)::

    q [B, H, T, 2d]    q[..., :d] = Q1 (signal query), q[..., d:] = Q2 (noise query)
    k [B, Hkv, S, 2d]  k[..., :d] = K1 (signal key),   k[..., d:] = K2 (noise key)
    v [B, Hkv, S, Dv]  shared by both maps (the paper's V is 2d wide; any Dv works)
    out [B, H, T, Dv]  H = the differential (signal) heads

This is unilm's weight layout as it stands: its q projection reshaped into 2H heads of width d with
adjacent pairs (2i, 2i+1) = (Q1_i, Q2_i) is exactly [H, 2d] with the halves above; keys likewise.
With ``groups=G`` the noise query of group g is the mean of the noise halves of its G heads. A
caller holding one noise query per group (GDA's own parameterization) passes it to
:func:`split_attention`, or repeats it into each member's noise half here (the mean returns it).

Spec ambiguities (spec/mechanisms.md §2C) and other choices:

* ``scale=None`` means d ** -0.5 with d = D/2, the width of one map (the paper's √d uses the HALF
  width), not the contract's usual D ** -0.5.
* λ (``lam``) is an input here: a float or a tensor of shape [] or [H] (per head, differentiable).
  Its re-parameterization exp(λq1·λk1) − exp(λq2·λk2) + λ_init, the λ_init schedule, the per-head
  RMSNorm and the (1 − λ_init) factor are layer parameters and live in
  :class:`attnlab.nn.DifferentialAttention`: the paper applies them after the subtraction, to the
  attention output, so the functional core stops at (A1 − λA2) V.
* GDA head layout: the G signal heads sharing noise map g are the consecutive heads gG .. gG+G−1
  (the spec's canonical block order). :class:`attnlab.nn.DifferentialAttention` reads Motif-2's
  stripe-ordered projections into this order.
* GDA and GQA: a noise map is shared only inside one kv group (as in Motif-2, where the noise groups
  nest in the key/value groups), so ``groups`` must divide H/Hkv. Values are per kv group, as in
  Motif-2; the spec's ``value_per_signal_head`` alternative is not offered.
* ``lam`` defaults to 0.8, the limit of the paper's λ_init schedule (deep layers).
* A query row with no allowed key outputs 0 (both maps are empty there).

Fast path: the dense fast softmax attention (PyTorch's fused kernel, or the block-sparse executor
for bottom-right causal cross-attention) run twice, once per map: H signal maps and H/G noise maps.
Neither T x S map is materialized. For the fused kernel each map's d-wide query is zero-extended to
2d against the packed keys (exact; see ``_one_map``), which keeps the kernel at its fast width.
The oracle materializes both maps and returns A1 − λA2 as the weights.

No log-sum-exp (``has_lse=False``; ``attention_lse`` refuses the mechanism): each map is a softmax
with its own LSE, but A1 − λA2 is a signed combination whose rows sum to 1 − λ, not one softmax,
so no single LSE merges partial results over key shards (each map's would, separately).
:func:`maps` returns both maps' outputs with their LSEs, for callers that merge them so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import reference as _reference
from attnlab.core import AttentionOutput, check_qkv, compute_dtype, positive_int, repeat_kv, resolve_scale
from attnlab.mechanisms import dense
from attnlab.spec import Impl, Kind, Mechanism, Workloads

DEFAULTS = {"lam": 0.8, "groups": 1}


def check_options(T: int, S: int, causal, opts: dict) -> dict:
    """What can be checked without the head counts (those are checked by the call itself)."""
    out = dict(opts)
    out["groups"] = positive_int("groups", opts["groups"])
    lam = opts["lam"]
    if isinstance(lam, Tensor):
        if lam.dim() > 1 or not lam.is_floating_point():
            raise ValueError(f"lam must be a float or a floating tensor of shape [] or [H], got {_describe(lam)}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite float or a tensor of shape [] or [H], got {lam!r}")
    return out


def _describe(lam: Tensor) -> str:
    return f"tensor of shape {tuple(lam.shape)} and dtype {lam.dtype}"


def _lam(lam, H: int, dtype: torch.dtype, device: torch.device):
    """λ as a float, or a per-head tensor [H] in the compute dtype (gradients flow through)."""
    if not isinstance(lam, Tensor):
        return float(lam)
    if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != H) or not lam.is_floating_point():
        raise ValueError(f"lam must be a float or a floating tensor of shape [] or [H={H}], got {_describe(lam)}")
    return lam.to(device=device, dtype=dtype).expand(H)


def _check_groups(groups: int, H: int, Hkv: int) -> None:
    positive_int("groups", groups)
    if (H // Hkv) % groups != 0:
        raise ValueError(
            f"groups={groups} must divide the query heads per kv head H/Hkv={H // Hkv} (H={H}, Hkv={Hkv}): "
            "a noise map is shared by the signal heads of one group, which must read one kv head"
        )


def _half(q: Tensor, k: Tensor, v: Tensor) -> int:
    D = check_qkv(q, k, v).D
    if D % 2:
        raise ValueError(f"q and k head dim must be even (two maps of D/2 each), got D={D}")
    return D // 2


def _half_mask(like: Tensor, which: int) -> Tensor:
    """[2d] ones on the which-th half, zeros on the other, in like's dtype."""
    d = like.shape[-1] // 2
    mask = like.new_zeros(2 * d)
    mask[which * d : (which + 1) * d] = 1
    return mask


def _one_map(
    q_ext: Tensor, k: Tensor, v: Tensor, which: int, causal: bool, scale: float, need_lse: bool = False
) -> AttentionOutput:
    """One softmax map, never materialized. q_ext [B, h, T, 2d] holds the map's query in its which-th
    half and zeros in the other, so q_ext · k over 2d is the map's logit q_half · k_half (and the
    LSE over those logits is the map's)."""
    d = q_ext.shape[-1] // 2
    if dense.sdpa_supports(q_ext, k, v, causal, need_lse) is None:
        # The fused CPU kernel wants one head width for q, k and v and runs d = 32 slower than
        # 64: at 2d against the packed keys it reads k as it is, with no copy or padding of k.
        return dense.sdpa(q_ext, k, v, causal=causal, scale=scale)
    half = slice(which * d, (which + 1) * d)
    return dense.blocksparse(q_ext[..., half], k[..., half], v, causal=causal, scale=scale)


def _differential(q_signal: Tensor, q_noise: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, lam) -> Tensor:
    """q_signal [B, H, T, 2d] = (Q1 | 0), q_noise [B, H/G, T, 2d] = (0 | Q2), k [B, Hkv, S, 2d] = (K1 | K2),
    v [B, Hkv, S, Dv] -> [B, H, T, Dv]."""
    (B, H, T, _), Hn, Dv = q_signal.shape, q_noise.shape[1], v.shape[-1]
    ct = compute_dtype(q_signal.dtype)
    lam = _lam(lam, H, ct, q_signal.device)
    signal = _one_map(q_signal, k, v, 0, causal, scale).out.to(ct).unflatten(1, (Hn, H // Hn))  # [B, H/G, G, T, Dv]
    noise = _one_map(q_noise, k, v, 1, causal, scale).out.to(ct).unsqueeze(2)  # [B, H/G, 1, T, Dv]
    # the G signal heads of a group meet their one noise map by broadcasting, not by a copy
    if isinstance(lam, Tensor):
        out = torch.addcmul(signal, lam.view(1, Hn, H // Hn, 1, 1), noise, value=-1.0)
    else:
        out = torch.add(signal, noise, alpha=-lam)
    return out.view(B, H, T, Dv).to(q_signal.dtype)


def group_noise_queries(q: Tensor, groups: int) -> Tensor:
    """[B, H, T, E] -> [B, H/G, T, E]: the mean over each group of G consecutive heads."""
    return q if groups == 1 else q.unflatten(1, (-1, groups)).mean(2)


def split_attention(
    q_signal: Tensor,
    q_noise: Tensor,
    k_signal: Tensor,
    k_noise: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    lam=0.8,
) -> Tensor:
    """(A1 − λ A2) V with the maps' queries and keys given apart (GDA's own parameterization).

    q_signal [B, H, T, d], q_noise [B, H/G, T, d], k_signal and k_noise [B, Hkv, S, d],
    v [B, Hkv, S, Dv] -> [B, H, T, Dv]. G = H / q_noise heads must divide H/Hkv. ``scale=None``
    means d ** -0.5. Signal head i subtracts the noise map of head i // G.
    """
    B, H, Hkv, T, S, d, Dv = check_qkv(q_signal, k_signal, v)
    if k_noise.shape != k_signal.shape:
        raise ValueError(f"k_noise must have k_signal's shape {tuple(k_signal.shape)}, got {tuple(k_noise.shape)}")
    Hn = q_noise.shape[1] if q_noise.dim() == 4 else 0
    if q_noise.dim() != 4 or Hn == 0 or H % Hn or q_noise.shape[::2] != q_signal.shape[::2]:
        raise ValueError(f"q_noise must be [B={B}, H/G, T={T}, d={d}] with H/G dividing H={H}, got {q_noise.shape}")
    G = H // Hn
    _check_groups(G, H, Hkv)
    check_qkv(q_noise, k_noise, v)
    scale = resolve_scale(scale, d)
    k = torch.cat([k_signal, k_noise], dim=-1)  # [B, Hkv, S, 2d]
    q_signal, q_noise = F.pad(q_signal, (0, d)), F.pad(q_noise, (d, 0))  # (Q1 | 0), (0 | Q2)
    return _differential(q_signal, q_noise, k, v, causal, scale, lam)


def _queries(q: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(Q1 | 0) [B, H, T, 2d] and (0 | mean of each group's Q2) [B, H/G, T, 2d]."""
    return q * _half_mask(q, 0), group_noise_queries(q, groups) * _half_mask(q, 1)


def maps(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, **options
) -> tuple[AttentionOutput, AttentionOutput]:
    """The two softmax maps apart, packed layout as :func:`attention`: signal A1 V (out [B, H, T, Dv],
    lse [B, H, T]) and noise A2 V (out [B, H/G, T, Dv], lse [B, H/G, T]), each with its LSE.
    ``attention`` returns signal − λ · noise (signal head i reads noise head i // G); each map merges
    over key shards by its own LSE (the module docstring says why the difference has none)."""
    d = _half(q, k, v)
    opts = SPEC.resolve(q.shape[2], k.shape[2], causal, options)
    _check_groups(opts["groups"], q.shape[1], k.shape[1])
    q_signal, q_noise = _queries(q, opts["groups"])
    scale = resolve_scale(scale, d)
    return _one_map(q_signal, k, v, 0, causal, scale, True), _one_map(q_noise, k, v, 1, causal, scale, True)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, lam=0.8, groups: int = 1
) -> AttentionOutput:
    """Differential attention in the packed layout (module docstring): q [B, H, T, 2d],
    k [B, Hkv, S, 2d], v [B, Hkv, S, Dv] -> out [B, H, T, Dv]; no LSE (not one softmax)."""
    d = _half(q, k, v)
    _check_groups(groups, q.shape[1], k.shape[1])
    q_signal, q_noise = _queries(q, groups)
    out = _differential(q_signal, q_noise, k, v, causal, resolve_scale(scale, d), lam)
    return AttentionOutput(out, None)


def oracle(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale=None, lam=0.8, groups: int = 1
) -> _reference.Reference:
    """Both maps materialized by the dense oracle; weights = A1 − λ A2 [B, H, T, S], no LSE."""
    d = _half(q, k, v)
    H, Hkv = q.shape[1], k.shape[1]
    _check_groups(groups, H, Hkv)
    scale = resolve_scale(scale, d)
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    a1 = _reference.attention(q[..., :d], k[..., :d], v, causal=causal, scale=scale).weights  # [B, H, T, S]
    q2 = q[..., d:].unflatten(1, (H // groups, groups)).mean(2)  # [B, H/G, T, d]: one noise query per group
    a2 = _reference.attention(q2, k[..., d:], v, causal=causal, scale=scale).weights  # [B, H/G, T, S]
    lam = _lam(lam, H, ct, q.device)
    lam = lam.view(1, H, 1, 1) if isinstance(lam, Tensor) else lam
    weights = a1 - lam * a2.repeat_interleave(groups, dim=1)  # [B, H, T, S]
    out = torch.einsum("bhts,bhsd->bhtd", weights, repeat_kv(v, H // Hkv))
    return _reference.Reference(out.to(dtype), weights, None)


SPEC = Mechanism(
    "differential",
    "DIFF Transformer, arXiv 2410.05258; Grouped Differential Attention (GDA), arXiv 2510.06949",
    Kind.COMPOSITE,  # two softmax maps subtracted: the oracle materializes both
    {"two_maps": Impl(attention, traced=True)},
    check_options,
    DEFAULTS,
    has_lse=False,
    no_lse="A1 - lam*A2: two softmax maps subtracted; each map has an LSE, their signed difference none",
    drop_in=False,  # q, k carry two maps in their halves: a layer must be built for it
    example=lambda S: {"lam": 0.7},
    workloads=Workloads(heads=4),
    oracle=oracle,
)

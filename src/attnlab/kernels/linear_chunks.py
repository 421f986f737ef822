"""The chunked core of the linear family (``linear``, ``lightning``, CARE's global branch).

Causal (decayed) linear attention with query t at key position ``offset + t``::

    num_t = sum_{j <= p_t} gamma ** (p_t - j) (phi(q_t) . phi(k_j)) v_j      den_t: the same with v_j = 1

Tokens are cut into chunks of C: inside a chunk a masked, decayed C x C product; across chunks a
running state ``kv = sum_j gamma**(...) phi(k_j)^T v_j`` [F, Dv] (and ``z = sum_j gamma**(...)
phi(k_j)`` [F] for the denominator). Chunks are processed ``BLOCK_CHUNKS`` at a time: the chunks
of a block run as one batched product, the states entering them come from one [n, n] matmul, and
the state crosses blocks. Features are computed per block too, so the only tensor the size of the
sequence is the output: memory stays O(T * Dv + block * (C + F + Dv)), and large temporaries are
reused from the allocator instead of being page-faulted in afresh. Few large ops matter on CPU:
each op pays a thread barrier, and on a shared machine barriers cost more than small arithmetic.

Decays enter only as ``gamma ** e`` with ``e >= 0`` (computed as ``exp(e * log gamma)``), so nothing
overflows however small gamma or long the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core import repeat_kv

BLOCK_CHUNKS = 128  # chunks per batched block of the causal pass
BLOCK_TOKENS = 16384  # tokens per block of the key-only passes (prefix state, non-causal)
EPS = 1e-6  # the denominator floor of normalized feature maps (see mechanisms/linear.py)


@dataclass(frozen=True)
class Features:
    """How raw q/k/v slices become features in the compute dtype (kv heads repeated to query heads:
    the decay, and so the state, is per query head)."""

    phi: Callable[[Tensor], Tensor]
    scale: float
    groups: int
    dtype: torch.dtype
    normalized: bool

    def q(self, q: Tensor, a: int, b: int) -> Tensor:
        return self.phi(q[:, :, a:b].to(self.dtype)) * self.scale  # [B, H, b-a, F]

    def kv(self, k: Tensor, v: Tensor, a: int, b: int) -> tuple[Tensor, Tensor]:
        """phi(k) [B,H,n,F] and v [B,H,n,Dv] for keys [a, b); keys past the end are zero features
        (they contribute nothing but keep the decay counting)."""
        kf = repeat_kv(self.phi(k[:, :, a:b].to(self.dtype)), self.groups)
        vf = repeat_kv(v[:, :, a:b].to(self.dtype), self.groups)
        short = (b - a) - kf.shape[2]
        if short > 0:
            kf, vf = F.pad(kf, (0, 0, 0, short)), F.pad(vf, (0, 0, 0, short))
        return kf, vf


State = tuple[Tensor, Tensor | None]  # (kv [B,H,F,Dv], z [B,H,F] or None)


def _powers(log_g: Tensor, exponents: Tensor) -> Tensor:
    """gamma_h ** e for e >= 0: [H] x [...] -> [H, ...]."""
    return torch.exp(log_g.view(-1, *([1] * exponents.dim())) * exponents.to(log_g.dtype))


def _scan(local: Tensor, log_g: Tensor | None, C: int, init: Tensor | None) -> tuple[Tensor, Tensor]:
    """States entering each of n chunks (an exclusive prefix over axis 2) and the state after the
    last. local [B,H,n,...]: each chunk's own contribution, already decayed to the chunk's end.

    One [n, n] (per-head decayed, strictly lower-triangular) matmul instead of n small steps: on a
    loaded CPU every op pays a thread barrier, so few large ops beat many small ones by far."""
    B, H, n = local.shape[:3]
    c = torch.arange(n, device=local.device)
    gap = c.view(n, 1) - 1 - c.view(1, n)  # chunks between c' and c: the state decays gamma**(C*gap)
    if log_g is None:
        weights = (gap >= 0).to(local.dtype)  # [n, n]
    else:
        weights = _powers(log_g * C, gap.clamp_min(0)) * (gap >= 0)  # [H, n, n]
    flat = local.reshape(B, H, n, -1)
    before = weights @ flat  # [B, H, n, R]
    if init is not None:
        entering = init.reshape(B, H, 1, -1)
        if log_g is not None:
            entering = entering * _powers(log_g * C, c).view(1, H, n, 1)  # init decays gamma**(C*c)
        before = before + entering
    last = before[:, :, -1] * (1.0 if log_g is None else torch.exp(log_g * C).view(1, H, 1)) + flat[:, :, -1]
    return before.view(local.shape), last.view(local[:, :, 0].shape)


def _chunks(qf: Tensor, kf: Tensor, vf: Tensor, log_g: Tensor | None, state: State | None, normalized: bool):
    """n aligned chunks of C tokens (query i at key position i): qf [B,H,n,C,F], kf [B,H,n,C,F],
    vf [B,H,n,C,Dv]. Returns num [B,H,n,C,Dv], den [B,H,n,C] (None unless normalized), state."""
    H, C = qf.shape[1], qf.shape[3]
    kv0, z0 = state if state is not None else (None, None)
    i = torch.arange(C, device=qf.device)
    below = i.view(C, 1) >= i.view(1, C)  # key j <= query i inside a chunk
    scores = qf @ kf.transpose(-1, -2)  # [B,H,n,C,C]
    if log_g is None:
        scores = scores.masked_fill(~below, 0.0)
        kd, qd = kf, qf
    else:
        lg = log_g.view(1, H, 1, 1, 1)
        scores = scores * (_powers(log_g, (i.view(C, 1) - i.view(1, C)).clamp_min(0)) * below).view(1, H, 1, C, C)
        kd = kf * torch.exp(lg * (C - 1 - i).view(C, 1))  # gamma**(C-1-j): key j decayed to the chunk's end
        qd = qf * torch.exp(lg * (i + 1).view(C, 1))  # gamma**(i+1): the entering state decayed to query i
    before, kv = _scan(kd.transpose(-1, -2) @ vf, log_g, C, kv0)  # [B,H,n,F,Dv]
    num = qd @ before
    num = torch.baddbmm(num.flatten(0, 2), scores.flatten(0, 2), vf.flatten(0, 2)).view(num.shape)  # + intra
    if not normalized:
        return num, None, (kv, None)
    before_z, z = _scan(kd.sum(3), log_g, C, z0)  # [B,H,n,F]
    den = scores.sum(-1) + (qd @ before_z.unsqueeze(-1)).squeeze(-1)
    return num, den, (kv, z)


def _block(qf, kf, vf, log_g, chunk: int, state: State | None, normalized: bool):
    """One aligned block of L tokens: its full chunks batched, then the remainder as one chunk."""
    B, H, L, _ = qf.shape
    full = (L // chunk) * chunk
    nums, dens = [], []
    for lo, hi, n in ((0, full, full // chunk), (full, L, 1)):
        if hi > lo:
            cut = [x[:, :, lo:hi].reshape(B, H, n, (hi - lo) // n, x.shape[-1]) for x in (qf, kf, vf)]
            num, den, state = _chunks(*cut, log_g, state, normalized)
            nums.append(num.flatten(2, 3))
            dens.append(den.flatten(2, 3) if normalized else None)
    num = nums[0] if len(nums) == 1 else torch.cat(nums, dim=2)
    den = None if not normalized else dens[0] if len(dens) == 1 else torch.cat(dens, dim=2)
    return num, den, state


def aligned(q, k, v, feats: Features, log_g, chunk: int, state: State | None, finish: bool, k_start: int = 0):
    """Queries q[:, :, t] at key position k_start + t, over keys k_start.. (zero keys past the end).

    Returns (out [B,H,T,Dv] in q.dtype, None) when ``finish``, else (num, den) in the compute dtype,
    and the state after the last query's position."""
    B, H, T, _ = q.shape
    block = chunk * BLOCK_CHUNKS
    outs, dens = [], []
    for a in range(0, T, block):
        b = min(T, a + block)
        kf, vf = feats.kv(k, v, k_start + a, k_start + b)
        num, den, state = _block(feats.q(q, a, b), kf, vf, log_g, chunk, state, feats.normalized)
        if finish:
            outs.append(divide(num, den).to(q.dtype))
        else:
            outs.append(num)
            dens.append(den)
    if state is None:  # T == 0
        Fd, Dv = q.shape[-1], v.shape[-1]
        state = (q.new_zeros(B, H, Fd, Dv, dtype=feats.dtype), q.new_zeros(B, H, Fd, dtype=feats.dtype))
        state = state if feats.normalized else (state[0], None)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    if finish or not feats.normalized:
        return out, None, state
    return out, (dens[0] if len(dens) == 1 else torch.cat(dens, dim=2) if dens else out.new_zeros(B, H, 0)), state


def divide(num: Tensor, den: Tensor | None) -> Tensor:
    """num [..., Dv] / max(den [...], EPS); den None means unnormalized."""
    return num if den is None else num / den.clamp_min(EPS).unsqueeze(-1)


def prefix_state(k, v, feats: Features, log_g, P: int) -> State | None:
    """The state after keys [0, P): sum_j gamma**(P-1-j) phi(k_j)^T v_j, a block of keys at a time."""
    kv = z = None
    for a in range(0, P, BLOCK_TOKENS):
        b = min(P, a + BLOCK_TOKENS)
        kf, vf = feats.kv(k, v, a, b)
        if log_g is not None:
            kf = kf * _powers(log_g, torch.arange(b - a - 1, -1, -1, device=kf.device)).unsqueeze(-1)
            if kv is not None:  # the earlier blocks' state decays across this block
                kv = kv * torch.exp(log_g * (b - a)).view(1, -1, 1, 1)
                z = z * torch.exp(log_g * (b - a)).view(1, -1, 1) if z is not None else None
        kv_b = kf.transpose(-1, -2) @ vf
        z_b = kf.sum(2) if feats.normalized else None
        kv = kv_b if kv is None else kv + kv_b
        z = z_b if z is None else z + z_b
    return None if kv is None else (kv, z)


def causal(q, k, v, feats: Features, log_g, offset: int, chunk: int, finish: bool):
    """Query t at key position offset + t sees keys j <= offset + t: out (or num, den) [B,H,T,..].

    Keys before the first query's position fold into an incoming state; queries before key 0 see
    nothing (0); queries past the last key see every key."""
    T, S = q.shape[2], k.shape[2]
    lo = min(T, max(0, -offset))  # queries with no key
    P = min(S, max(0, offset))  # keys that precede every query
    state = prefix_state(k, v, feats, log_g, P) if P else None
    out, den, _ = aligned(q[:, :, lo:], k, v, feats, log_g, chunk, state, finish, k_start=P)
    if lo:
        out = F.pad(out, (0, 0, lo, 0))
        den = F.pad(den, (lo, 0)) if den is not None else None
    return out, den


def noncausal(q, k, v, feats: Features, log_g, chunk: int) -> Tensor:
    """Every query sees every key (at gamma ** |p_t - j| with a decay). Returns out in q.dtype."""
    T, S = q.shape[2], k.shape[2]
    if log_g is None:
        B, H, Fd, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
        zeros = (q.new_zeros(B, H, Fd, Dv, dtype=feats.dtype), q.new_zeros(B, H, Fd, dtype=feats.dtype))
        kv, z = prefix_state(k, v, feats, None, S) or (zeros[0], zeros[1] if feats.normalized else None)
        outs = [q.new_zeros(B, H, 0, Dv)]
        for a in range(0, T, BLOCK_TOKENS):
            qf = feats.q(q, a, min(T, a + BLOCK_TOKENS))
            den = (qf @ z.unsqueeze(-1)).squeeze(-1) if z is not None else None
            outs.append(divide(qf @ kv, den).to(q.dtype))
        outs = outs[1:] or outs
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    # keys at or before p_t: the causal pass; keys after p_t: the causal pass over the reversed
    # sequences, where reversed query t' sits at position t' - 1 and sees gamma**((t'-1) - j') * gamma.
    num, den = causal(q, k, v, feats, log_g, S - T, chunk, finish=False)
    num_b, den_b = causal(q.flip(2), k.flip(2), v.flip(2), feats, log_g, -1, chunk, finish=False)
    g = torch.exp(log_g).view(1, -1, 1)
    num = num + num_b.flip(2) * g.unsqueeze(-1)
    den = den + den_b.flip(2) * g if den is not None else None
    return divide(num, den).to(q.dtype)

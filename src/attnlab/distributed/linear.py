"""Context parallelism for the linear family (``linear``, ``lightning``): a state scan across ranks.

Linear attention summarizes any run of keys in a fixed-size state ``kv = sum_j gamma**(...)
phi(k_j)^T v_j`` [H, F, Dv] (and ``z`` [H, F] for normalized maps), so W ranks holding contiguous
shards in rank order only exchange these summaries, O(F * Dv) per rank whatever T is (the scan of
Lightning Attention-2, arXiv 2401.04658, run over ranks instead of chunks):

    causal:      P_r = sum_{s<r} gamma ** (n_{s+1} + ... + n_{r-1}) * L_s   (L_s: rank s's state)
                 rank r then runs the recurrent form from P_r over its own tokens
    non-causal:  no decay: every rank divides by the total state sum_s L_s;
                 decay: local symmetric pass + gamma**(i+1) q_i P_r + gamma**(n_r-i) q_i A_r, with
                 A_r the later ranks' states decayed toward rank r (no normalizer: parts add)

One ``all_gather`` of a fixed-size tensor carries the states; it is
``torch.distributed.nn.functional.all_gather``, so gradients flow back to the rank that owns them.
Ring attention and Ulysses (softmax mechanisms) are not built yet.
"""

from __future__ import annotations

import warnings
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather as _all_gather

from attnlab.core import check_causal, check_qkv
from attnlab.kernels import linear_chunks
from attnlab.mechanisms import lightning
from attnlab.mechanisms import linear as _linear
from attnlab.spec import Kind, Mechanism

SLOTS = 16  # fields in the agreement check's fingerprint


def _record(mechanism) -> Mechanism:
    from attnlab import registry  # late: the registry imports every mechanism module

    spec = mechanism if isinstance(mechanism, Mechanism) else registry.get(mechanism)
    if spec.kind is not Kind.LINEAR:
        raise ValueError(
            f"mechanism {spec.name!r} is {spec.kind.value}, not linear: linear_cp scans fixed-size states; "
            "use ring/Ulysses, not built yet"
        )
    return spec


def _fingerprint(sh, dtype, spec: Mechanism, causal: bool, scale, opts: dict) -> dict[str, object]:
    """What every rank must agree on (the local length T may differ between ranks)."""
    fields = {"shapes (B, H, Hkv, D, Dv)": (sh.B, sh.H, sh.Hkv, sh.D, sh.Dv), "dtype": dtype}
    fields.update({"mechanism": spec.name, "causal": causal, "scale": scale})
    fields.update({f"option {name!r}": value for name, value in sorted(opts.items())})
    return fields


def _agree(fields: dict, T: int, device, group, timeout: float) -> list[int]:
    """All-gather a hash per field and the local lengths; raise on any disagreement (on every rank,
    since all see the same table). Returns the ranks' lengths [W]. Waits at most ``timeout`` s."""
    # A fixed size (padded, and anything past SLOTS folded into the last slot) so that ranks with
    # different mechanisms, hence different option counts, still meet in the same all_gather.
    hashes = [zlib.crc32(repr(item).encode()) for item in fields.items()]
    hashes = hashes[: SLOTS - 1] + [zlib.crc32(repr(hashes[SLOTS - 1 :]).encode())] if len(hashes) > SLOTS else hashes
    mine = torch.tensor([T, *hashes] + [0] * (SLOTS - len(hashes)), dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group, async_op=True).wait(timeout=timedelta(seconds=timeout))
    table = torch.stack(table).cpu()  # [W, 1 + fields]
    names = list(fields) if len(fields) <= SLOTS else list(fields)[: SLOTS - 1] + [", ".join(list(fields)[SLOTS - 1 :])]
    names += ["the option names"] * (SLOTS - len(names))  # padding differs only with the option count
    differ = [name for i, name in enumerate(names) if bool((table[:, 1 + i] != table[0, 1 + i]).any())]
    if differ:
        raise ValueError(f"linear_cp: the ranks disagree on {', '.join(differ)} (this rank has {fields})")
    return table[:, 0].tolist()


def _params(spec: Mechanism, H: int, opts: dict, device) -> tuple[str, Tensor | None]:
    """(feature map, per-head decay [H] or None) of a linear-family record's resolved options."""
    if "decay" in opts:  # the decayed variant: identity features, no normalizer (lightning.py)
        return "identity", lightning.decay_tensor(opts["decay"], H, device)
    return opts["feature_map"], None


def _pack(state) -> Tensor:
    kv, z = state  # [B, H, F, Dv], [B, H, F] or None
    return kv.flatten(1) if z is None else torch.cat([kv.flatten(1), z.flatten(1)], dim=1)


def _combine(flat: Tensor, weights: Tensor, shape: tuple):
    """sum_s weights[s, h] * state_s: flat [W, B, size] packed states, weights [W, H] -> (kv, z).

    A weighted sum over *all* ranks (zero weights included) keeps the all_gather in every rank's
    autograd graph, so every rank joins its backward collective; skipping ranks would deadlock."""
    B, H, Fd, Dv, normalized = shape
    kv = flat[:, :, : H * Fd * Dv].reshape(-1, B, H, Fd, Dv)
    z = flat[:, :, H * Fd * Dv :].reshape(-1, B, H, Fd) if normalized else None
    kv = torch.einsum("wh,wbhfe->bhfe", weights, kv)
    return kv, None if z is None else torch.einsum("wh,wbhf->bhf", weights, z)


def _weights(take: list[bool], steps: list[int], log_g: Tensor | None, H: int, like: Tensor):
    """[W, H]: gamma_h ** steps[s] for the ranks s taken, 0 for the others."""
    mask = torch.tensor(take, dtype=like.dtype, device=like.device).view(-1, 1)  # [W, 1]
    if log_g is None:
        return mask.expand(-1, H)
    m = torch.tensor(steps, dtype=like.dtype, device=like.device).view(-1, 1)
    return mask * torch.exp(log_g.view(1, -1) * m)  # steps >= 0 where taken: no overflow


def linear_cp(q_l, k_l, v_l, mechanism, *, causal, group=None, timeout: float = 60.0, scale=None, **options) -> Tensor:
    """Attention of a linear-family ``mechanism`` over a sequence split contiguously across the ranks
    of ``group`` (rank r holds ``contiguous(T, W).ranges[r]``): q_l [B,H,n_r,D], k_l [B,Hkv,n_r,D],
    v_l [B,Hkv,n_r,Dv] -> this rank's rows of the full-sequence output [B,H,n_r,Dv]. Every rank must
    call it with the same shapes, dtype, mechanism, ``causal``, ``scale`` and options (checked first:
    a ValueError names what differs). ``timeout`` bounds that first check, so a rank that never
    arrives makes the others raise; the state exchange after it runs under the group's own timeout."""
    spec = _record(mechanism)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    sh = check_qkv(q_l, k_l, v_l)
    if sh.T != sh.S:
        raise ValueError(f"k_l must hold the same tokens as q_l (self-attention): T={sh.T} != S={sh.S}")
    causal = check_causal(causal)
    opts = spec.resolve(sh.T, sh.S, causal, options)
    fields = _fingerprint(sh, q_l.dtype, spec, causal, scale, opts)
    lengths = _agree(fields, sh.T, q_l.device, group, timeout)
    rank = dist.get_rank(group)

    fmap, decay = _params(spec, sh.H, opts, q_l.device)
    feats = _linear.features(q_l, k_l, scale, fmap)
    log_g = None if decay is None else torch.log(decay.to(feats.dtype))
    out_dtype, (q, k, v) = q_l.dtype, (t.to(feats.dtype) for t in (q_l, k_l, v_l))
    n, shape = sh.T, (sh.B, sh.H, sh.D, sh.Dv, feats.normalized)
    mine = [linear_chunks.prefix_state(k, v, feats, log_g, n)]  # L_r: decayed to this shard's end
    if log_g is not None and not causal:  # R_r: decayed toward this shard's start
        mine.append(linear_chunks.prefix_state(k.flip(2), v.flip(2), feats, log_g, n))
    packed = torch.cat([_pack(s) for s in mine], dim=1)  # [B, size] per state kind
    with warnings.catch_warnings():  # deprecated in favour of functional collectives, which lack a backward
        warnings.simplefilter("ignore", FutureWarning)
        flat = torch.stack(_all_gather(packed, group=group))  # [W, B, size * len(mine)]
    size, W = packed.shape[1] // len(mine), len(lengths)
    starts = [sum(lengths[:s]) for s in range(W + 1)]
    # before: rank s's end-state decays over the tokens of ranks s+1..rank-1
    before = _weights(
        [s < rank for s in range(W)],
        [max(0, starts[rank] - starts[s + 1]) for s in range(W)],
        log_g,
        sh.H,
        flat,
    )
    P = _combine(flat[:, :, :size], before, shape)

    if causal:
        out = linear_chunks.aligned(q, k, v, feats, log_g, opts["chunk_size"], P, finish=True)[0]
        return out.to(out_dtype)
    qf = feats.q(q, 0, n)  # [B, H, n, F]
    if log_g is None:  # every rank's state, undecayed: the whole sequence
        kv, z = _combine(flat, torch.ones_like(before), shape)
        den = (qf @ z.unsqueeze(-1)).squeeze(-1) if z is not None else None
        return linear_chunks.divide(qf @ kv, den).to(out_dtype)
    # after: rank s's start-state decays over the tokens of ranks rank+1..s-1
    after = _weights(
        [s > rank for s in range(W)],
        [max(0, starts[s] - starts[rank + 1]) for s in range(W)],
        log_g,
        sh.H,
        flat,
    )
    A = _combine(flat[:, :, size:], after, shape)
    i = torch.arange(n, device=q.device, dtype=qf.dtype)
    out = linear_chunks.noncausal(q, k, v, feats, log_g, opts["chunk_size"])
    # earlier keys j: gamma ** (p_i - j) = gamma ** (i + 1) * gamma ** (start - 1 - j)
    out = out + torch.exp(log_g.view(-1, 1) * (i + 1)).unsqueeze(-1) * (qf @ P[0])
    # later keys j: gamma ** (j - p_i) = gamma ** (n - i) * gamma ** (j - end)
    out = out + torch.exp(log_g.view(-1, 1) * (n - i)).unsqueeze(-1) * (qf @ A[0])
    return out.to(out_dtype)


__all__ = ["linear_cp"]

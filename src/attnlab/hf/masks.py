"""transformers' attention masks, interpreted: a mask is never dropped.

transformers hands an attention function its [B, 1, T, S] mask (causal and padding) or None (plain
causal / bidirectional). A mask that is "the causal structure restricted to a contiguous run of real
keys" per batch row (left padding in decoders, right padding in encoders) is served by the fast path
on each row's real tokens, so the mechanism sees every sequence without its pads: a streaming sink
is the first real token, not a pad. Query rows outside the real run output 0 (they are padding).
Any other mask (packed sequences, custom 4D masks) is combined with the mechanism's own mask and run
on the dense reference, exactly, at O(T*S) cost; data-dependent mechanisms refuse such masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab import reference as _reference
from attnlab import registry
from attnlab.hf.tokens import at_length, for_row
from attnlab.spec import Kind


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mechanism: str, *, causal: bool, scale=None, **options
) -> Tensor:
    """``attnlab.attention`` under an extra transformers-style mask [B or 1, 1, T, S] (bool, True =
    allowed, or additive float 0 / min). See the module docstring for how each mask is served."""
    S = k.shape[2]
    if mask is None:
        return registry.attention(q, k, v, mechanism, causal=causal, scale=scale, **at_length(options, S))
    allowed = as_bool(mask)
    runs = key_runs(allowed, causal)
    if runs is None:
        return _dense_fallback(q, k, v, allowed, mechanism, causal, scale, at_length(options, S))
    B, H, T, _ = q.shape
    if all(lo == 0 and hi == S for lo, hi in runs):
        return registry.attention(q, k, v, mechanism, causal=causal, scale=scale, **at_length(options, S))
    out = q.new_zeros(B, H, T, v.shape[-1])
    for b, (lo, hi) in enumerate(runs):
        rows = slice(max(0, lo - (S - T)), max(0, hi - (S - T)))  # query rows at real positions
        if hi <= lo or rows.start >= rows.stop:
            continue
        qb, kb, vb = q[b : b + 1, :, rows], k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi]
        opts = for_row(options, S, b, slice(lo, hi))
        out[b : b + 1, :, rows] = registry.attention(qb, kb, vb, mechanism, causal=causal, scale=scale, **opts)
    return out


def as_bool(mask: Tensor) -> Tensor:
    """A transformers mask as bool (True = allowed); additive masks must be 0 / very negative only."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be bool or an additive float mask, got {mask.dtype}")
    allowed = mask == 0
    if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
        raise ValueError(
            "attention_mask carries an additive bias (values other than 0 and -inf); attnlab "
            "mechanisms only take allowed/blocked masks"
        )
    return allowed


def key_runs(allowed: Tensor, causal: bool) -> list[tuple[int, int]] | None:
    """Per batch row, the run [lo, hi) of real keys when ``allowed`` [B, 1, T, S] is exactly the
    (bottom-right) causal or full structure restricted to that run on every real query row; else None."""
    if allowed.dim() != 4 or allowed.shape[1] != 1:
        return None
    B, _, T, S = allowed.shape
    j = torch.arange(S, device=allowed.device)
    p = torch.arange(T, device=allowed.device) + S - T  # query positions
    runs = []
    for b in range(allowed.shape[0]):
        m = allowed[b, 0]
        seen = m.any(0).nonzero().flatten()
        if seen.numel() == 0:
            runs.append((0, 0))
            continue
        lo, hi = int(seen[0]), int(seen[-1]) + 1
        real = (p >= lo) & (p < hi)
        want = (j >= lo) & (j < hi)
        want = want & (j <= p.unsqueeze(1)) if causal else want.expand(T, S)
        if not torch.equal(m[real], want[real]):
            return None
        runs.append((lo, hi))
    return runs


def unpadded(mask: Tensor | None, causal: bool, S: int) -> bool:
    """Whether ``mask`` is None or just the causal/full structure over all S keys of every row."""
    if mask is None:
        return True
    runs = key_runs(as_bool(mask), causal)
    return runs is not None and all(run == (0, S) for run in runs)


def _dense_fallback(q, k, v, allowed, mechanism, causal, scale, options) -> Tensor:
    mech = registry.get(mechanism)
    if mech.kind is not Kind.MASK:  # only one softmax under a fixed mask can take a second mask
        raise ValueError(
            f"{mechanism} cannot be combined with this attention mask (not a padding mask over contiguous real "
            "tokens); pass unpadded or left-padded batches"
        )
    own = mech.dense_mask(q.shape[2], k.shape[2], causal=causal, kv_heads=k.shape[1], **options)
    own = _reference.query_head_mask(own.to(q.device), q.shape[1])  # [B|1, H|1, T, S]
    return _reference.attention(q, k, v, own & allowed, scale=scale).out

"""Document (varlen / packed-sequence) masking: several documents packed into one sequence attend
only within their own document, optionally causally. Used for packed pre-training since
"Efficient Sequence Packing without Cross-contamination" (Kosec et al., arXiv 2107.02027) and by
FlashAttention's varlen kernels (Dao, arXiv 2307.08691).

The options describe the S keys: ``lengths=`` (document lengths summing to S) or
``document_ids=`` (int [S] or [B, S]). Query row i sits at key position p = i + S - T and belongs to
that position's document; rows with p < 0 see nothing.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from attnlab.kernels import build_layout
from attnlab.kernels.layout import block_ranges, cached_layout, query_positions, take
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"lengths": None, "document_ids": None}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    lengths, ids = opts["lengths"], opts["document_ids"]
    if (lengths is None) == (ids is None):
        raise ValueError(
            "document needs exactly one of lengths= (doc lengths summing to S) or document_ids= (int [S] or [B, S])"
        )
    if lengths is not None:
        lengths = tuple(lengths.tolist() if isinstance(lengths, Tensor) else lengths)
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths) or sum(lengths) != S:
            raise ValueError(f"lengths must be positive ints summing to the key length S={S}, got {lengths}")
        return {"lengths": lengths, "document_ids": None}
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"document_ids must be an integer tensor, got {type(ids).__name__} {getattr(ids, 'dtype', '')}"
        )
    if ids.dim() not in (1, 2) or ids.shape[-1] != S:
        raise ValueError(f"document_ids must be [S={S}] or [B, S={S}], got shape {tuple(ids.shape)}")
    return {"lengths": None, "document_ids": ids}


def _ids(S: int, lengths: tuple[int, ...] | None, document_ids: Tensor | None) -> Tensor:
    """int64 [Bl, S]."""
    if lengths is not None:
        counts = torch.tensor(lengths)  # host: layout planning
        return torch.repeat_interleave(torch.arange(len(lengths)), counts).unsqueeze(0)  # host: layout planning
    ids = document_ids.to(device="cpu", dtype=torch.long)
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def mask(T: int, S: int, *, causal: bool, lengths, document_ids) -> Tensor:
    """bool [Bl, 1, T, S]: Bl = B for per-batch document_ids, else 1."""
    ids = _ids(S, lengths, document_ids)  # [Bl, S]
    p = torch.arange(T) + (S - T)  # host: dense oracle mask
    q_doc = torch.where(p >= 0, ids[:, p.clamp(min=0)], -1)  # [Bl, T]; -1 matches nothing
    allowed = (q_doc.unsqueeze(2) == ids.unsqueeze(1)) & (p >= 0).view(1, T, 1)
    if causal:
        allowed = allowed & (torch.arange(S).view(1, 1, S) <= p.view(1, T, 1))  # host: dense oracle mask
    return allowed.unsqueeze(1)


def _mask_mod(ids: Tensor, offset: int, causal: bool):
    def document(b, h, q_idx, kv_idx):
        p = q_idx + offset
        same = take(ids, b, p.clamp(min=0)) == take(ids, b, kv_idx)
        ok = same & (p >= 0)
        return ok & (kv_idx <= p) if causal else ok

    return document


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], lengths, document_ids):
    ids = _ids(S, lengths, document_ids)  # [Bl, S]
    _, last_pos = query_positions(T, S, block[0])
    # Each document's first and last key position bounds the keys a query in it can see.
    n_docs = int(ids.max()) - int(ids.min()) + 1
    doc = ids - ids.min()
    pos = torch.arange(S).expand_as(doc)  # host: layout planning
    lo_doc = torch.full((doc.shape[0], n_docs), S).scatter_reduce(1, doc, pos, "amin")  # host: layout planning
    hi_doc = torch.zeros(doc.shape[0], n_docs, dtype=torch.long)  # host: layout planning
    hi_doc = hi_doc.scatter_reduce(1, doc, pos + 1, "amax")
    rows = torch.arange(T) + (S - T)  # host: layout planning
    row_doc = doc[:, rows.clamp(min=0)]
    row_lo = torch.where(rows >= 0, lo_doc.gather(1, row_doc), S).amin(0)  # [T] over the batch
    row_hi = torch.where(rows >= 0, hi_doc.gather(1, row_doc), 0).amax(0)
    lo, hi = block_ranges(row_lo, row_hi, block[0])
    if causal:
        hi = torch.minimum(hi, last_pos + 1)
    return build_layout(
        _mask_mod(ids, S - T, causal),
        T,
        S,
        key_ranges=[(lo, hi)],
        batch=ids.shape[0],
        block=block,
        rebind=lambda device: _mask_mod(ids.to(device), S - T, causal),
    )


def packed_lengths(T: int, seed: int = 0) -> tuple[int, ...]:
    """A realistic packed-batch mix summing to T: log-normal document lengths around T/8, seeded."""
    rng = random.Random(seed)
    out, left = [], T
    while left > 0:
        n = min(left, max(16, int(rng.lognormvariate(math.log(T / 8), 0.8))))
        out.append(n)
        left -= n
    return tuple(out)


def _example(S: int) -> dict:
    third = max(1, S // 3)
    return {"lengths": tuple(n for n in (third, third, S - 2 * third) if n > 0)}


SPEC = Mechanism(
    "document",
    "packed sequences, arXiv 2107.02027; FlashAttention-2 varlen, arXiv 2307.08691",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    example=_example,
    workloads=Workloads(
        efficiency=lambda T: {"lengths": packed_lengths(T)},
        untrainable="a packing mask: on one unpacked sequence it is dense attention",
    ),
    mask=mask,
    layout=layout,
)

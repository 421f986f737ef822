"""Per-token options that follow a growing sequence, for KV-cache decoding.

An option that describes each key (``document``'s ``document_ids``, one id per token) must have the
key length S of every call. Under ``generate()`` S grows by one per step, so a fixed tensor (or
``document``'s ``lengths=``, which must sum to S) cannot serve past the prompt. Wrapped in
:func:`per_token`, the ids are cut or extended to each call's S by the adapter: key position j takes
``ids[..., j]`` and positions past the end take the last id (new tokens belong to the last
document). A left-padded batch's rows take their real keys' ids, like their keys.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PerToken:
    """Ids over token positions, ``[P]`` (every batch row) or ``[B, P]``; see the module docstring."""

    def __init__(self, ids: Tensor):
        integer = isinstance(ids, Tensor) and not (ids.dtype.is_floating_point or ids.dtype.is_complex)
        if not integer or ids.dtype == torch.bool:
            got = f"{type(ids).__name__} {getattr(ids, 'dtype', '')}"
            raise ValueError(f"per_token needs an integer tensor of ids, got {got}")
        if ids.dim() not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(f"per_token ids must be [P] or [B, P] with P >= 1, got shape {tuple(ids.shape)}")
        self.ids = ids

    def at(self, S: int) -> Tensor:
        """The ids of S key positions: [S] or [B, S]."""
        n = self.ids.shape[-1]
        if S <= n:
            return self.ids[..., :S]
        tail = self.ids[..., -1:].expand(*self.ids.shape[:-1], S - n)  # new tokens: the last id
        return torch.cat([self.ids, tail], -1)

    def row(self, S: int, b: int, keys: slice) -> Tensor:
        """Batch row ``b``'s ids over its real ``keys`` of S positions: [n] or [1, n]."""
        ids = self.at(S)
        if ids.dim() == 2 and ids.shape[0] > 1:
            ids = ids[b : b + 1]
        return ids[..., keys]

    def __repr__(self) -> str:
        return f"per_token(shape={tuple(self.ids.shape)})"


def per_token(ids: Tensor) -> PerToken:
    """Mark ``ids`` (int [P] or [B, P]) as a per-token option that follows the sequence as it grows:
    ``model.config.attnlab = {"document_ids": attnlab.hf.per_token(ids)}``."""
    return PerToken(ids)


def at_length(options: dict, S: int) -> dict:
    """``options`` for a call over S keys: per-token values cut or extended to S."""
    return {k: v.at(S) if isinstance(v, PerToken) else v for k, v in options.items()}


def for_row(options: dict, S: int, b: int, keys: slice) -> dict:
    """``options`` for batch row ``b`` run alone on its real ``keys`` (of S positions)."""
    return {k: v.row(S, b, keys) if isinstance(v, PerToken) else v for k, v in options.items()}

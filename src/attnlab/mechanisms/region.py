"""Region (layout-guided) masks: token groups plus a rule table of which group may attend which.

The pattern of layout-to-image and multi-subject generation, e.g. AnyMS and MODA-style attention
control, where the image tokens of subject r (those inside its box) attend only to their own
region and to their own text, while the text attends to everything. It generalizes ``document``
(the identity rule table) to arbitrary group rules.

``groups`` labels the S keys with group ids 0..G-1 (int [S] or [B, S]; default: one group); query row i belongs to the
group of key position p = i + S - T (bottom-right, as everywhere). ``rules`` is a bool [G, G] table,
``rules[a, b]`` = group a may attend group b; None means "only its own group". ``causal`` composes.
Rows whose group may attend nothing output 0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnlab.core import near_square
from attnlab.kernels import build_layout
from attnlab.kernels.layout import cached_layout, query_positions, take
from attnlab.spec import Kind, Mechanism, Workloads

DEFAULTS = {"groups": None, "rules": None}


def check_options(T: int, S: int, causal: bool, opts: dict) -> dict:
    groups, rules = opts["groups"], opts["rules"]
    if groups is None:  # the default: one group, i.e. plain (causal) attention
        groups = torch.zeros(S, dtype=torch.long)  # host: option default, read on the host
    if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        got = type(groups).__name__
        raise ValueError(f"groups must be an integer tensor of group ids, [S] or [B, S], got {got}")
    if groups.dim() not in (1, 2) or groups.shape[-1] != S:
        raise ValueError(f"groups must be [S={S}] or [B, S={S}], got shape {tuple(groups.shape)}")
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("groups ids must be >= 0")
    n = int(groups.max()) + 1 if groups.numel() else 1
    if rules is None:
        rules = torch.eye(n, dtype=torch.bool)  # host: option default, read on the host
    square = isinstance(rules, Tensor) and rules.dim() == 2 and rules.shape[0] == rules.shape[1]
    if not square or rules.dtype != torch.bool:
        raise ValueError(f"rules must be a square bool tensor [G, G] (rules[a, b]: a may attend b), got {rules!r}")
    if rules.shape[0] < n:
        raise ValueError(f"rules is {tuple(rules.shape)} but groups uses ids up to {n - 1}")
    return {"groups": groups, "rules": rules}


def _ids(groups: Tensor) -> Tensor:
    g = groups.to(device="cpu", dtype=torch.long)
    return g.unsqueeze(0) if g.dim() == 1 else g  # [Bl, S]


def mask(T: int, S: int, *, causal: bool, groups: Tensor, rules: Tensor) -> Tensor:
    """bool [Bl, 1, T, S]: Bl = B for per-batch groups, else 1."""
    ids = _ids(groups)
    p = torch.arange(T) + (S - T)  # host: dense oracle mask
    q_group = ids[:, p.clamp(min=0)]  # [Bl, T]
    allowed = rules.cpu()[q_group.unsqueeze(2), ids.unsqueeze(1)] & (p >= 0).view(1, T, 1)
    if causal:
        allowed = allowed & (torch.arange(S).view(1, 1, S) <= p.view(1, T, 1))  # host: dense oracle mask
    return allowed.unsqueeze(1)


@cached_layout
def layout(T: int, S: int, *, causal: bool, block: tuple[int, int], groups: Tensor, rules: Tensor):
    """The block layout. Non-causal self-attention with batch-shared groups runs with the tokens
    sorted by group (``BlockLayout.order``): every allowed (group, group) pair becomes a contiguous
    rectangle of mostly full blocks, however scattered the regions are in the image."""
    ids = _ids(groups)
    if not causal and T == S and ids.shape[0] == 1:
        order = torch.argsort(ids[0], stable=True)
        return dataclasses.replace(_layout(T, S, False, ids[:, order], rules.cpu(), block), order=order)
    return _layout(T, S, causal, ids, rules.cpu(), block)


def _region_mod(table: Tensor, ids: Tensor, off: int, causal: bool):
    def region(b, h, q_idx, kv_idx):
        p = q_idx + off
        ok = take(table, take(ids, b, p.clamp(min=0)), take(ids, b, kv_idx)) & (p >= 0)
        return ok & (kv_idx <= p) if causal else ok

    return region


def _layout(T: int, S: int, causal: bool, ids: Tensor, table: Tensor, block: tuple[int, int]):
    off = S - T

    # One key range per target group: from its first to its last token, kept only for query blocks
    # holding a group that may attend it.
    G, Bq = table.shape[0], block[0]
    first_pos, last_pos = query_positions(T, S, Bq)
    nQB = first_pos.shape[0]
    pos = torch.arange(S).expand_as(ids)  # host: layout planning
    lo_g = torch.full((ids.shape[0], G), S).scatter_reduce(1, ids, pos, "amin").amin(0)  # host: layout planning
    hi_g = torch.zeros(ids.shape[0], G, dtype=torch.long)  # host: layout planning
    hi_g = hi_g.scatter_reduce(1, ids, pos + 1, "amax").amax(0)
    rows = (torch.arange(nQB * Bq) + off).clamp(0, S - 1)  # host: layout planning
    present = torch.zeros(nQB, G, dtype=torch.bool)  # host: layout planning
    for b in range(ids.shape[0]):
        present |= torch.nn.functional.one_hot(ids[b, rows], G).view(nQB, Bq, G).any(1)
    reach = (present.float() @ table.float()) > 0  # [nQB, G]: target groups some row may attend
    ranges = []
    for g in range(G):
        hi = torch.where(reach[:, g], hi_g[g], 0)
        if causal:
            hi = torch.minimum(hi, last_pos + 1)
        ranges.append((torch.where(reach[:, g], lo_g[g], 0), hi))
    rebind = lambda device: _region_mod(table.to(device), ids.to(device), off, causal)  # noqa: E731
    mod = _region_mod(table, ids, off, causal)
    return build_layout(mod, T, S, key_ranges=ranges, batch=ids.shape[0], block=block, rebind=rebind)


def _example(S: int) -> dict:
    """Text (group 0) sees everything; two subjects (1, 2) see themselves and the text."""
    groups = (torch.arange(S) * 3 // max(S, 1)).clamp(max=2)  # host: example option
    rules = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])  # host: example option
    return {"groups": groups, "rules": rules}


def layout_to_image(T: int) -> dict:
    """A layout-to-image batch: T/8 text tokens, then an image grid with four subject boxes (the
    quadrants' centres) on a background. Text and background see everything; subject r sees the
    text and itself."""
    text = T // 8
    h, w = near_square(T - text) if T - text >= 4 else (1, T - text)
    y, x = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)  # host: workload option
    quadrant = 1 + (y >= h // 2).long() * 2 + (x >= w // 2).long()
    inside = ((y % (h // 2 or 1)) >= h // 8) & ((x % (w // 2 or 1)) >= w // 8)
    image = torch.where(inside, quadrant, 5).flatten()
    rest = torch.full((T - text - image.numel(),), 5)  # host: workload option
    groups = torch.cat([torch.zeros(text, dtype=torch.long), image, rest])  # host: workload option
    rules = torch.eye(6, dtype=torch.bool)  # host: workload option
    rules[:, 0] = True
    rules[0] = rules[5] = True
    return {"groups": groups, "rules": rules}


SPEC = Mechanism(
    "region",
    "layout-guided masks: AnyMS, MODA (multi-subject / layout-to-image attention control)",
    Kind.MASK,
    {},  # the record's blocksparse
    check_options,
    DEFAULTS,
    example=_example,
    workloads=Workloads(
        efficiency=layout_to_image, untrainable="needs per-token layout groups (layout-to-image control)"
    ),
    mask=mask,
    layout=layout,
)

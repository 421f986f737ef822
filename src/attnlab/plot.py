"""Pictures to look at before reading code: a mechanism's mask, a selection's kept blocks, and the
attention weights of a small input, each written to a PNG whose path is returned.

matplotlib is the ``viz`` extra (``pip install attnlab[viz]``). It is imported on first use, and only
its object-oriented API (``matplotlib.figure.Figure``, saved by the Agg canvas), so drawing never
switches the caller's pyplot backend or touches pyplot's global figures.

Pictures are in token positions: query rows top to bottom, key columns left to right. Past
``MAX_CELLS`` positions a side, each drawn cell is the mean over the positions it covers (the
fraction allowed, for a mask), so thin bands such as a window of 16 in 8192 keys stay visible
instead of being dropped by the image resampling.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import registry

MAX_CELLS = 256  # drawn cells a side, at most
MAX_PANELS = (4, 8)  # batch rows x kv heads drawn, at most
MAX_WEIGHTS = 2**22  # T * S of the weights plot: it materializes them
_PANEL_IN = 3.2  # inches a panel


def _figure(rows: int, cols: int, title: str):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("attnlab.plot draws with matplotlib, which is not installed: pip install attnlab[viz]") from e
    fig = Figure(figsize=(max(_PANEL_IN * cols + 0.4, 5), _PANEL_IN * rows + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(title, fontsize=9, wrap=True)
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _describe(options: dict) -> str:
    """Options for a title: tensors by shape, everything else as written."""

    def one(v):
        return f"tensor{list(v.shape)}" if isinstance(v, Tensor) else repr(v)

    return ", ".join(f"{k}={one(v)}" for k, v in options.items())


def pooled(a: Tensor, cells: int = MAX_CELLS) -> Tensor:
    """``a`` [T, S] as at most ``cells`` x ``cells`` means over the positions each cell covers (the
    last cell of a row or column may cover fewer): what the pictures draw."""
    a = a.detach().to("cpu", torch.float64)
    fT, fS = math.ceil(a.shape[0] / cells), math.ceil(a.shape[1] / cells)
    if fT == 1 and fS == 1:
        return a
    pad = (0, -a.shape[1] % fS, 0, -a.shape[0] % fT)
    total = F.avg_pool2d(F.pad(a, pad)[None], (fT, fS), divisor_override=1)[0]
    count = F.avg_pool2d(F.pad(torch.ones_like(a), pad)[None], (fT, fS), divisor_override=1)[0]
    return total / count


def _draw(ax, a: Tensor, *, cmap: str, vmin: float, vmax: float, label: str):
    """``a`` [T, S] over its token extent, so ticks are positions whatever the pooling."""
    T, S = a.shape
    img = ax.imshow(
        pooled(a).numpy(),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        extent=(-0.5, S - 0.5, T - 0.5, -0.5),
        aspect="equal" if max(T, S) <= 4 * min(T, S) else "auto",
    )
    ax.set_xlabel(f"key{label}", fontsize=8)
    ax.set_ylabel(f"query{label}", fontsize=8)
    ax.tick_params(labelsize=7)
    return img


def _shade_blocks(ax, layout, b: int, h: int) -> None:
    """Tint the layout's tiles of slice (b, h): full green, partial orange, skipped untinted, with the
    tile grid; the slice index clamps where the layout is shared by the batch or the heads."""
    kv = layout.kv_blocks[min(b, layout.kv_blocks.shape[0] - 1), min(h, layout.kv_blocks.shape[1] - 1)].cpu()
    part = layout.partial[min(b, layout.partial.shape[0] - 1), min(h, layout.partial.shape[1] - 1)].cpu()
    nQ, nK = layout.n_q_blocks, layout.n_k_blocks
    code = torch.zeros(nQ, nK, dtype=torch.long)  # host: a picture; 0 skipped, 1 full, 2 partial
    rows = torch.arange(nQ)[:, None].expand_as(kv)  # host: kv was moved to the host above
    seen = kv >= 0
    code[rows[seen], kv[seen]] = torch.where(part[seen], 2, 1)
    rgba = [[0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3], [1.0, 0.55, 0.0, 0.35]]
    colours = torch.tensor(rgba, dtype=torch.float64)  # host: a picture's colours
    bq, bk = layout.block_q, layout.block_k
    ax.imshow(
        colours[code].numpy(),
        interpolation="nearest",
        extent=(-0.5, nK * bk - 0.5, nQ * bq - 0.5, -0.5),
        aspect=ax.get_aspect(),  # the mask's: square cells where the mask has them
    )
    for x in range(bk, nK * bk, bk):
        ax.axvline(x - 0.5, color="0.6", lw=0.4)
    for y in range(bq, nQ * bq, bq):
        ax.axhline(y - 0.5, color="0.6", lw=0.4)
    ax.set_xlim(-0.5, layout.S - 0.5)
    ax.set_ylim(layout.T - 0.5, -0.5)


def _panels(m: Tensor, title: str, layout=None, batch_rows: int = MAX_PANELS[0]):
    """One panel per (batch row, kv head) of a bool mask [B, Hkv, T, S], capped at ``MAX_PANELS``;
    under a layout with a token order (grid mechanisms) the mask is drawn in that order, which is
    the order the tiles are cut in."""
    B, Hkv = min(m.shape[0], batch_rows), min(m.shape[1], MAX_PANELS[1])
    left = m.shape[0] * m.shape[1] - B * Hkv
    fig, axes = _figure(B, Hkv, title + (f"\n({left} more panels not drawn)" if left else ""))
    order = None if layout is None or layout.order is None else layout.order.cpu()
    label = " position" if order is None else " position, in the layout's tile order"
    for b in range(B):
        for h in range(Hkv):
            ax, a = axes[b][h], m[b, h].cpu()
            if order is not None:
                a = a[order][:, order]
            _draw(ax, a.float(), cmap="Blues", vmin=0, vmax=1, label=label)
            if layout is not None:
                _shade_blocks(ax, layout, b, h)
            if B * Hkv > 1:
                ax.set_title(f"batch {b}, kv head {h}", fontsize=8)
    return fig


def mask_figure(name: str, T: int, S: int | None = None, *, causal=False, blocks: bool = False, **options):
    """The figure :func:`mask` saves (for inspecting what is drawn)."""
    S = T if S is None else S
    rec = registry.get(name)
    m = rec.dense_mask(T, S, causal=causal, **options)  # [B|1, Hkv|1, T, S]
    layout = rec.block_layout(T, S, causal=causal, **options) if blocks else None
    density = m.float().mean().item()
    shown = {**rec.resolve(T, S, causal, {k: o for k, o in options.items() if k != "kv_heads"}), **options}
    title = f"{name}  T={T} S={S} causal={causal}\n{_describe(shown) or 'no options'}\nallowed {density:.1%}"
    if layout is not None:
        title += f", tiles {layout.block_q}x{layout.block_k}: green full, orange partial"
    return _panels(m, title, layout)


def mask(name: str, T: int, S: int | None = None, *, causal=False, path=None, blocks: bool = False, **options) -> Path:
    """Draw mechanism ``name``'s dense mask (True = allowed, dark) for T queries and S keys (default
    T) to a PNG; a grid of panels when it differs per batch row or kv head (``kv_heads=``).
    ``blocks=True`` tints the tiles of ``attnlab.get(name).block_layout`` (full, partial, skipped).
    Returns the path (default ``attnlab_<name>_mask.png``)."""
    fig = mask_figure(name, T, S, causal=causal, blocks=blocks, **options)
    return _save(fig, path or f"attnlab_{name}_mask.png")


def selection_figure(selection):
    """The figure :func:`selection` saves."""
    if not hasattr(selection, "layout") or not hasattr(selection, "dense_mask"):
        raise ValueError(
            f"selection must be what a selecting mechanism's select() returned (with .layout and .dense_mask()), "
            f"got {type(selection).__name__}"
        )
    lay = selection.layout
    m = selection.dense_mask()[:1]  # [1, Hkv|1, T, S]: the first batch row
    title = f"{type(selection).__name__}  T={lay.T} S={lay.S}  batch 0\nkept {m.float().mean().item():.1%}"
    title += f", tiles {lay.block_q}x{lay.block_k}: green full, orange partial"
    return _panels(m, title, lay, batch_rows=1)


def selection(selection, path=None) -> Path:
    """Draw a selection's kept keys and blocks (block_topk, dynamic_hierarchical: what ``select()``
    returned), one panel per kv head of the first batch row. Returns the path (default
    ``attnlab_selection.png``)."""
    return _save(selection_figure(selection), path or "attnlab_selection.png")


def weights_figure(q: Tensor, k: Tensor, v: Tensor, name: str, *, head: int = 0, batch: int = 0, **options):
    """The figure :func:`weights` saves."""
    T, S = q.shape[-2], k.shape[-2]
    if T * S > MAX_WEIGHTS:
        raise ValueError(f"weights materializes T x S: T*S = {T * S} is over {MAX_WEIGHTS}; plot a smaller input")
    for arg, val, n in (("head", head, q.shape[1]), ("batch", batch, q.shape[0])):
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < n:
            raise ValueError(f"{arg} must be an int in [0, {n}), got {val!r}")
    w = registry.get(name).weights(q, k, v, **options)  # [B, H, T, S]
    if w is None:
        raise ValueError(f"{name}'s oracle combines several attentions and has no single weight matrix to draw")
    w = w[batch, head].detach().float().cpu()  # [T, S]
    shown = {k: o for k, o in options.items() if k not in ("scale",)}
    fig, axes = _figure(1, 1, f"{name}  T={T} S={S}  batch {batch}, head {head}\n{_describe(shown)}")
    lo, hi = w.min().item(), w.max().item()
    if lo < 0:  # signed weights (differential attention): a diverging map centred on 0
        bound = max(-lo, hi)
        img = _draw(axes[0][0], w, cmap="RdBu_r", vmin=-bound, vmax=bound, label=" position")
    else:
        img = _draw(axes[0][0], w, cmap="magma_r", vmin=0, vmax=max(hi, 1e-12), label=" position")
    fig.colorbar(img, ax=axes[0][0], shrink=0.8).ax.tick_params(labelsize=7)
    return fig


def weights(q: Tensor, k: Tensor, v: Tensor, name: str, *, head: int = 0, batch: int = 0, path=None, **options) -> Path:
    """Draw the attention weights of one (batch row, query head) of a small input, from
    ``attnlab.get(name).weights(q, k, v, **options)`` (``causal=``, ``scale=`` and the mechanism's
    options pass through). Refuses T*S over ``MAX_WEIGHTS`` with a ValueError: the weights are
    materialized. Returns the path (default ``attnlab_<name>_weights.png``)."""
    fig = weights_figure(q, k, v, name, head=head, batch=batch, **options)
    return _save(fig, path or f"attnlab_{name}_weights.png")

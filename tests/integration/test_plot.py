"""attnlab.plot: each picture is read back from its PNG (or from the drawn array) and compared with
the mask, selection or weights it claims to show."""

import io
import sys

import numpy as np
import pytest
import torch

import attnlab
from attnlab import plot

image = pytest.importorskip("matplotlib.image")


def _cells(png, ax, T: int, S: int) -> torch.Tensor:
    """The saved picture sampled at the centre of each of the T x S token cells of panel ``ax``:
    True where it is dark (allowed). The axes box in pixels is where the image sits (no tight bbox)."""
    img = image.imread(io.BytesIO(png) if isinstance(png, bytes) else png)  # [H, W, 4], rows top to bottom
    box = ax.get_window_extent()
    rows = [int(img.shape[0] - (box.y1 - (i + 0.5) * box.height / T)) for i in range(T)]
    cols = [int(box.x0 + (j + 0.5) * box.width / S) for j in range(S)]
    return torch.from_numpy(img[np.ix_(rows, cols)][..., :3].mean(-1) < 0.5)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_mask_png_shows_the_mask_cell_by_cell(tmp_path):
    opts = dict(causal=True, window=5)
    path = plot.mask("sliding_window", 24, 32, path=tmp_path / "sw.png", **opts)
    assert path == tmp_path / "sw.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot.mask_figure("sliding_window", 24, 32, **opts)  # the same figure, for its axes box
    saved, again = image.imread(path), image.imread(io.BytesIO(_png(fig)))
    assert np.array_equal(saved, again)
    want = attnlab.mask("sliding_window", 24, 32, **opts)[0, 0]  # cross-causal: bottom-right aligned
    assert torch.equal(_cells(path, fig.axes[0], 24, 32), want)
    assert fig.axes[0].get_ylim() == (23.5, -0.5) and fig.axes[0].get_xlim() == (-0.5, 31.5)  # query 0 on top
    assert "window=5" in fig._suptitle.get_text()


def test_per_head_masks_get_one_panel_each():
    opts = dict(causal=True, kv_heads=2, block_size=4, local_blocks=1, vert_stride=3)
    fig = plot.mask_figure("strided_shard", 32, **opts)
    want = attnlab.mask("strided_shard", 32, 32, **opts)  # [1, 2, 32, 32]
    assert len(fig.axes) == 2 and not torch.equal(want[0, 0], want[0, 1])
    png = _png(fig)
    for h, ax in enumerate(fig.axes):
        assert torch.equal(_cells(png, ax, 32, 32), want[0, h]) and ax.get_title() == f"batch 0, kv head {h}"


def test_blocks_tint_full_partial_and_skipped_tiles_as_the_mask_has_them():
    T, opts = 32, dict(causal=True, window=20)
    with attnlab.kernels.block_size(8):
        fig = plot.mask_figure("sliding_window", T, blocks=True, **opts)
    m = attnlab.mask("sliding_window", T, T, **opts)[0, 0]
    tiles = m.reshape(4, 8, 4, 8).transpose(1, 2).float().mean((-1, -2))  # allowed share per 8 x 8 tile
    want = torch.where(tiles == 1, 1, torch.where(tiles == 0, 0, 2))  # 1 full, 0 skipped, 2 partial
    rgba = torch.as_tensor(np.asarray(fig.axes[0].images[1].get_array()))  # the tint over the mask
    drawn = torch.where(rgba[..., 3] == 0, 0, torch.where(rgba[..., 0] < 0.5, 1, 2))
    assert torch.equal(drawn, want) and set(want.unique().tolist()) == {0, 1, 2}
    assert torch.equal(_cells(_png(fig), fig.axes[0], T, T), m)  # the tint leaves the mask readable


def test_a_long_mask_is_drawn_as_the_fraction_allowed_per_cell():
    a = torch.arange(60.0).reshape(10, 6)
    got = plot.pooled(a, cells=4)  # 3 x 2 positions a cell; the last row of cells covers one row
    assert got.shape == (4, 3)
    assert got[0, 0] == a[:3, :2].mean() and got[3, 2] == a[9:, 4:].mean()
    m = attnlab.mask("sliding_window", 4096, 4096, causal=True, window=16)[0, 0]
    fig = plot.mask_figure("sliding_window", 4096, causal=True, window=16)
    drawn = torch.as_tensor(np.asarray(fig.axes[0].images[0].get_array()))
    assert drawn.shape == (plot.MAX_CELLS, plot.MAX_CELLS)
    assert torch.allclose(drawn.double(), plot.pooled(m.float())) and drawn.diagonal().min() > 0  # the band stays


def test_selection_png_shows_the_kept_keys_per_kv_head(tmp_path):
    rec = attnlab.get("block_topk")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 8, generator=g), torch.randn(2, 2, 64, 8, generator=g)
    opts = rec.resolve(64, 64, True, dict(block_size=8, top_k=4, init_blocks=1, local_blocks=1))
    sel = rec.select(q, k, causal=True, scale=None, **opts)
    path = plot.selection(sel, tmp_path / "sel.png")
    fig = plot.selection_figure(sel)
    assert np.array_equal(image.imread(path), image.imread(io.BytesIO(_png(fig))))  # drawn: its axes are placed
    want = sel.dense_mask()[0]  # [Hkv, T, S] of the first batch row
    assert len(fig.axes) == 2 and not torch.equal(want[0], want[1])
    for h, ax in enumerate(fig.axes):
        assert torch.equal(_cells(path, ax, 64, 64), want[h])
    with pytest.raises(ValueError, match="selection must be what a selecting mechanism's select"):
        plot.selection(torch.ones(3))


def test_weights_draws_the_asked_head(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 16, 8, generator=g) for h in (2, 1, 1))
    opts = dict(causal=True, window=4)
    path = plot.weights(q, k, v, "sliding_window", head=1, path=tmp_path / "w.png", **opts)
    assert path.stat().st_size > 0
    w = attnlab.get("sliding_window").weights(q, k, v, **opts)  # [1, 2, 16, 16]
    for head in (0, 1):
        fig = plot.weights_figure(q, k, v, "sliding_window", head=head, **opts)
        assert torch.allclose(torch.as_tensor(np.asarray(fig.axes[0].images[0].get_array())), w[0, head].double())
    assert not torch.allclose(w[0, 0], w[0, 1])


def test_weights_refuses_what_it_cannot_draw():
    big = torch.empty(1, 1, 4096, 8, device="meta")
    with pytest.raises(ValueError, match=r"T\*S = 16777216 is over 4194304"):
        plot.weights(big, big, big, "dense")
    small = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 2\), got 2"):
        plot.weights(small, small, small, "dense", head=2)
    with pytest.raises(ValueError, match="no single weight matrix"):
        plot.weights(small, small, small, "span_search", causal=True)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install attnlab\[viz\]"):
        plot.mask("dense", 4)

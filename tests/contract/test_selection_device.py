"""Selections live on q's device: block_topk, dynamic_hierarchical and span_search run on meta inputs
under a dispatch mode that records every op touching a tensor off that device (a factory without
``device=``, a CPU index into a device tensor). Meta also refuses every host read (``int(t)``,
``.item()``, ``nonzero``), so these runs prove the covered steps free of host syncs; the few syncs
that remain (a layout's width, boundary chunking's NMS walk) sit after the covered steps."""

import traceback

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnlab
from attnlab.mechanisms import block_topk, span_search
from attnlab.mechanisms import dynamic_hierarchical as dhsa

META = torch.device("meta")


class OffDevice(TorchDispatchMode):
    """Records ``op @ file:line`` (the innermost attnlab frame) for every op whose tensor arguments
    or results are not all on ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.seen = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) and t.device != self.device for t in tree_leaves((args, kwargs, out))):
            frames = [f for f in traceback.extract_stack() if "/attnlab/" in f.filename]
            where = f"{frames[-1].filename.split('/attnlab/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.seen.append(f"{func} @ {where}")
        return out


def run_on_meta(fn, *args, **kwargs):
    with OffDevice(META) as probe:
        result = fn(*args, **kwargs)
    assert not probe.seen, "ops off q's device:\n" + "\n".join(dict.fromkeys(probe.seen))
    return result


def tensors_in(obj) -> list[Tensor]:
    """Tensors held by a selection: its fields, its layout and what the layout's predicate captures."""
    found = []
    for x in obj if isinstance(obj, tuple) else (obj,):
        if isinstance(x, Tensor):
            found.append(x)
        elif isinstance(x, attnlab.kernels.BlockLayout):
            found += [x.kv_blocks, x.partial]
            for cell in x.mask_mod.__closure__ or ():
                found += tensors_in(cell.cell_contents) if isinstance(cell.cell_contents, tuple) else []
                found += [cell.cell_contents] if isinstance(cell.cell_contents, Tensor) else []
    return found


def meta(*shape):
    return torch.empty(*shape, device=META)


@pytest.mark.parametrize(("T", "S", "causal"), [(70, 70, True), (40, 90, True), (90, 40, False), (33, 33, False)])
def test_block_topk_select_and_its_layout_stay_on_the_device(T, S, causal):
    sel = run_on_meta(block_topk.select, meta(2, 4, T, 8), meta(2, 2, S, 8), causal=causal, block_size=8, top_k=3)
    held = tensors_in(sel)
    assert len(held) >= 3 and all(t.device == META for t in held)
    q_idx, kv_idx = torch.arange(8, device=META).view(-1, 1), torch.arange(8, device=META).view(1, -1)
    b = torch.zeros((), dtype=torch.long, device=META)
    run_on_meta(sel.layout.mask_mod, b, b, q_idx, kv_idx)
    run_on_meta(sel.dense_mask)
    # the same call on CPU: the width block_topk states equals the one read from the data
    q, k = torch.randn(2, 4, T, 8), torch.randn(2, 2, S, 8)
    lay = block_topk.select(q, k, causal=causal, block_size=8, top_k=3).layout
    assert lay.kv_blocks.shape[-1] == int((lay.kv_blocks >= 0).sum(-1).max())


@pytest.mark.parametrize(("T", "S"), [(70, 70), (40, 90), (90, 40)])
def test_dhsa_selection_up_to_its_blocks_stays_on_the_device(T, S):
    opts = {**dhsa.DEFAULTS, "chunking": "fixed", "chunk_size": 6, "budget": 25, "local": 4, "sinks": 3}
    with attnlab.kernels.block_size(8, 8):
        sel, visited, full = run_on_meta(dhsa._decide, meta(2, 4, T, 8), meta(2, 2, S, 8), None, opts)
    held = [*tensors_in(sel[:4]), visited, full]
    assert all(t.device == META for t in held)
    assert visited.shape == full.shape == (2, 1, -(-T // 8), -(-S // 8))
    # the predicate the layout will carry reads only these tensors
    q_idx, kv_idx = torch.arange(T, device=META).view(-1, 1), torch.arange(S, device=META).view(1, -1)
    b = torch.zeros(1, 1, dtype=torch.long, device=META)  # a 0-d index would be read on the host
    run_on_meta(dhsa._allowed, sel, b, q_idx, kv_idx, S - T)


def test_dhsa_boundary_scores_stay_on_the_device():
    # boundary chunking's mass ratio (two causal passes, chunked off CPU) runs on the device; its
    # NMS walk is sequential and reads the ratios on the host once
    ratio = run_on_meta(dhsa._boundary_ratio, meta(2, 4, 50, 8), meta(2, 2, 50, 8), 0.3, 3)
    assert ratio.shape == (2, 50 - 2 * 3)


@pytest.mark.parametrize(("T", "S"), [(150, 150), (60, 200), (200, 60)])
def test_span_search_runs_on_the_device(T, S):
    out = run_on_meta(span_search.attention, meta(2, 4, T, 8), meta(2, 2, S, 8), meta(2, 2, S, 6), causal=True)
    assert out.out.shape == (2, 4, T, 6) and out.out.device == META


@pytest.mark.parametrize("budget", [1 << 24, 64 * 6])  # one row chunk, or chunks of 16 rows
def test_chunked_causal_lse_matches_the_fused_kernel(monkeypatch, budget):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, dtype=torch.float64), torch.randn(2, 3, 50, 8, dtype=torch.float64)
    want = dhsa._causal_lse(q, k, 0.4)
    monkeypatch.setattr(dhsa, "_LSE_ELEMS", budget)
    torch.testing.assert_close(dhsa._causal_lse(q, k, 0.4, fused=False), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "opts",
    [
        {"chunking": "fixed", "chunk_size": 3, "budget": 40, "local": 0, "sinks": 0},
        {"chunking": "fixed", "chunk_size": 5, "budget": 23, "local": 2, "sinks": 7},
        {"chunking": "boundary", "budget": 30, "local": 1, "sinks": 2, "boundary_window": 2, "nms_window": 2},
        {"chunking": "boundary", "budget": 50, "local": 3, "sinks": 0, "boundary_window": 3, "threshold": 1.0},
    ],
)
def test_dhsa_static_bound_on_chosen_chunks_holds(monkeypatch, opts):
    """_decide sizes the per-row chunk slots from the options, not from the data: every row's chosen
    chunks must fit (a row beyond it would silently lose keys)."""
    from attnlab.mechanisms import dhsa_fill

    seen, classify = [], dhsa_fill._classify

    def spy(lo_c, hi_c, L, pair, b, k, n_chosen, *rest):
        seen.append((int(n_chosen.max()), rest[-1]))
        return classify(lo_c, hi_c, L, pair, b, k, n_chosen, *rest)

    monkeypatch.setattr(dhsa_fill, "_classify", spy)
    torch.manual_seed(len(str(opts)))
    q, k = torch.randn(2, 2, 120, 4), torch.randn(2, 2, 120, 4)
    with attnlab.kernels.block_size(8, 8):
        dhsa.select(q, k, **{**dhsa.DEFAULTS, **opts})
    assert seen and all(n <= bound for n, bound in seen)
    assert any(n >= bound - 3 for n, bound in seen)  # the bound is close, not merely large

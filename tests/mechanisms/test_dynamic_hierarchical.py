"""DHSA: the selection rule by loops, the boundary rule against a materialized attention map,
budgets, and the oracle under boundary chunking."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms import dynamic_hierarchical as dhsa
from attnlab.testing import compare_to_reference, tile_classes


def brute_mask(q, k, starts, budget, local, sinks):
    """The docstring's rule token by token (one batch row)."""
    T, S = q.shape[2], k.shape[2]
    chunk = [max(i for i, s in enumerate(starts) if s <= j) for j in range(S)]
    Nc = len(starts)
    sizes = [chunk.count(c) for c in range(Nc)]
    kbar = [math.sqrt(sizes[c]) * k[0, :, [j for j in range(S) if chunk[j] == c]].mean((0, 1)) for c in range(Nc)]
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = i + S - T
        if p < 0:
            continue
        u = chunk[p]
        rows = [r for r in range(T) if r + S - T >= 0 and chunk[r + S - T] == u]
        qbar = math.sqrt(len(rows)) * q[0][:, rows].mean((0, 1))
        score = [float(qbar @ kbar[c]) for c in range(Nc)]
        loc = [j for j in range(S) if p - local < j <= p]
        snk = [j for j in range(min(sinks, S)) if j <= p and j not in loc]
        rest = [j for j in range(S) if sinks <= j <= p - local]
        rest.sort(key=lambda j: (-score[chunk[j]], -chunk[j], -j))
        room = max(0, budget - len(loc) - len(snk))
        for j in loc + snk + rest[:room]:
            m[i, j] = True
    return m


@pytest.mark.parametrize(
    ("T", "S", "chunk", "budget", "local", "sinks"),
    [(40, 40, 6, 13, 3, 2), (17, 40, 6, 13, 3, 2), (52, 40, 6, 13, 3, 2), (45, 45, 4, 21, 2, 7), (30, 30, 7, 9, 0, 0)],
)
def test_selection_rule_by_loops(T, S, chunk, budget, local, sinks):
    torch.manual_seed(T)
    q = torch.randn(1, 2, T, 4, dtype=torch.float64)
    k = torch.randn(1, 2, S, 4, dtype=torch.float64)
    opts = {"chunking": "fixed", "chunk_size": chunk, "budget": budget, "local": local, "sinks": sinks}
    sel = dhsa.select(q, k, **opts)
    assert torch.equal(sel.dense_mask()[0, 0], brute_mask(q, k, list(range(0, S, chunk)), budget, local, sinks))


def test_boundary_rule_against_the_materialized_map():
    torch.manual_seed(1)
    T, w = 48, 2
    q = torch.randn(1, 2, T, 8, dtype=torch.float64)
    k = torch.randn(1, 2, T, 8, dtype=torch.float64)
    opts = {**dhsa.DEFAULTS, "boundary_window": w, "threshold": 1.05, "nms_window": 3, "max_chunks": 6}
    got = dhsa._boundaries(q, k, 8**-0.5, opts)[0].tolist()
    A = attnlab.reference.attention(q, k, k, causal=True).weights.mean(1)[0]  # [T, T]
    ratios = {}
    for c in range(w - 1, T - w - 1):
        past = A[c + w + 1 :, c - w + 1 : c + 1].sum()
        fut = A[c + w + 1 :, c + 1 : c + w + 1].sum()
        ratios[c] = float((max(past, fut) + 1e-6) / (min(past, fut) + 1e-6))
    keep = []
    for c in sorted(ratios, key=lambda c: -ratios[c]):
        if ratios[c] <= 1.05 or len(keep) >= 5:
            break
        if all(abs(c - x) >= 3 for x in keep):
            keep.append(c)
    assert len(got) > 1 and got == sorted({0, *(c + 1 for c in keep)})


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize(("H", "Hkv", "S", "w"), [(4, 2, 37, 3), (2, 2, 5, 4), (1, 1, 1, 1)])
def test_column_mass_and_band_against_the_materialized_map(dtype, tol, H, Hkv, S, w):
    torch.manual_seed(S)
    q = torch.randn(2, H, S, 8, dtype=dtype)
    k = torch.randn(2, Hkv, S, 8, dtype=dtype)
    cols, band = dhsa._column_mass(q, k, 8**-0.5, w)
    kk = k.repeat_interleave(H // Hkv, 1)
    A = attnlab.reference.attention(q.double(), kk.double(), kk.double(), causal=True).weights.mean(1)  # [B, S, S]
    torch.testing.assert_close(cols.double(), A.sum(1), rtol=tol, atol=tol)
    for d in range(2 * w):
        want = torch.zeros(2, S, dtype=torch.float64)
        want[:, : max(S - d, 0)] = A.diagonal(-d, 1, 2)  # A[j + d, j]
        torch.testing.assert_close(band[..., d].double(), want, rtol=tol, atol=tol)


def test_full_budget_is_dense_and_boundary_chunking_matches_oracle():
    q = torch.randn(1, 4, 60, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 60, 8, dtype=torch.float64)
    out = attnlab.attention(q, k, v, "dynamic_hierarchical", causal=True, budget=60, local=4, sinks=2)
    torch.testing.assert_close(out, attnlab.attention(q, k, v, causal=True))
    opts = {"budget": 20, "local": 4, "sinks": 2, "chunk_size": 8, "boundary_window": 2, "threshold": 1.0}
    assert not compare_to_reference("dynamic_hierarchical", q, k, v, causal=True, **opts)


@pytest.mark.parametrize(
    ("opts", "causal", "match"),
    [
        ({}, False, "causal"),
        ({"chunking": "x"}, True, "chunking must be"),
        ({"budget": 0}, True, "budget must be"),
        ({"threshold": 0.5}, True, "threshold must be a number >= 1"),
    ],
)
def test_bad_options(opts, causal, match):
    q, k, v = torch.randn(3, 1, 1, 16, 4)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "dynamic_hierarchical", causal=causal, **opts)


def test_boundary_chunking_needs_self_attention():
    q = torch.randn(1, 1, 8, 4)
    k, v = torch.randn(2, 1, 1, 16, 4)
    with pytest.raises(ValueError, match="chunking='boundary' needs self-attention"):
        attnlab.attention(q, k, v, "dynamic_hierarchical", causal=True)


@pytest.mark.parametrize(
    ("T", "S", "blocks"), [(50, 50, (8, 16)), (33, 70, (16, 8)), (90, 90, (5, 7)), (70, 40, (4, 4))]
)
def test_layout_is_the_exact_block_classification_of_the_selection(T, S, blocks):
    """The analytic block classification (from per-row intervals) equals classifying the tiles of
    the selection's dense mask: nothing visited in vain, every full block found."""
    from attnlab.kernels import block_size

    torch.manual_seed(1)
    q, k = torch.randn(1, 2, T, 4), torch.randn(1, 2, S, 4)
    with block_size(*blocks):
        sel = dhsa.select(q, k, chunking="fixed", chunk_size=5, budget=17, local=4, sinks=3)
    lay = sel.layout
    want_v, want_f = tile_classes(sel.dense_mask()[0, 0], *blocks)
    want_f[:, -1] &= S % blocks[1] == 0  # ragged last key block always runs masked
    got_v = torch.zeros_like(want_v)
    got_p = torch.zeros_like(want_v)
    for n in range(lay.n_q_blocks):
        for m, part in zip(lay.kv_blocks[0, 0, n].tolist(), lay.partial[0, 0, n].tolist()):
            if m >= 0:
                got_v[n, m], got_p[n, m] = True, part
    assert torch.equal(got_v, want_v)
    assert torch.equal(got_v & ~got_p, want_v & want_f)


@pytest.mark.parametrize("S", [1, 3, 7])
def test_boundary_chunking_on_sequences_shorter_than_its_window(S):
    q = torch.randn(1, 2, S, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, S, 4, dtype=torch.float64)
    opts = {"budget": 3, "local": 1, "sinks": 1, "boundary_window": 4}
    assert not compare_to_reference("dynamic_hierarchical", q, k, v, causal=True, **opts)


def test_row_passes_do_not_change_the_selection(monkeypatch):
    from attnlab.kernels import block_size

    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 90, 4), torch.randn(2, 2, 90, 4)
    opts = {"chunking": "fixed", "chunk_size": 5, "budget": 17, "local": 4, "sinks": 3}
    with block_size(8, 8):
        one = dhsa.select(q, k, **opts)
        monkeypatch.setattr(dhsa, "_ROWS_ELEMS", 1)  # one query block per pass
        many = dhsa.select(q, k, **opts)
    for a, b in ((one.take, many.take), (one.cut, many.cut), (one.layout.kv_blocks, many.layout.kv_blocks)):
        assert torch.equal(a, b)
    assert torch.equal(one.layout.partial, many.layout.partial)


def test_given_selection_equals_recomputing_and_is_not_recomputed(monkeypatch):
    """``selection=`` takes DHSA's own selection: the same output (and gradients) as selecting again,
    on the fast path and on the oracle, without calling select() a second time."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 40, 8, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, 2, 2, 40, 8, dtype=torch.float64, generator=g)
    opts = {"chunking": "fixed", "chunk_size": 6, "budget": 13, "local": 3, "sinks": 2}
    sel = attnlab.get("dynamic_hierarchical").select(q, k, causal=True, **opts)
    fresh = attnlab.attention(q, k, v, "dynamic_hierarchical", causal=True, **opts)

    def refuse(*a, **kw):
        raise AssertionError("select() ran although a selection was given")

    monkeypatch.setattr(dhsa, "select", refuse)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    given = attnlab.attention(*leaves, "dynamic_hierarchical", causal=True, selection=sel, **opts)
    torch.testing.assert_close(given, fresh, atol=0, rtol=0)
    given.sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = attnlab.attention(*ref_leaves, "dynamic_hierarchical", causal=True, impl="reference", selection=sel, **opts)
    torch.testing.assert_close(given, ref)
    ref.sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="selection must be a ChunkSelection for T=40, S=40"):
        attnlab.attention(q, k, v, "dynamic_hierarchical", causal=True, selection=sel.layout, **opts)


def test_given_selection_under_torch_compile_runs_eagerly_and_exactly():
    """A selection cannot travel through the compiled op (a layout and a closure): the call runs
    eagerly behind one graph break, with the same result as in eager mode."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 1, 2, 32, 8, generator=g)
    opts = {"chunking": "fixed", "chunk_size": 4, "budget": 9, "local": 2, "sinks": 1}
    sel = attnlab.get("dynamic_hierarchical").select(q, k, causal=True, **opts)

    def fn(q, k, v):
        return attnlab.attention(q * 1, k, v, "dynamic_hierarchical", causal=True, selection=sel, **opts) * 2

    torch._dynamo.reset()
    assert len(torch._dynamo.explain(fn)(q, k, v).break_reasons) == 1
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, k, v), fn(q, k, v), atol=0, rtol=0)

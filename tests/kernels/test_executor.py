"""The block-sparse executor: exact block classification, exact merges, no T x S tensors, linear memory."""

import contextlib
import weakref

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.core import merge_lse
from attnlab.kernels import block_size, block_sparse_attention, build_layout, gathered
from attnlab.testing import LargestTensor, tile_classes


def test_layout_classifies_blocks_exactly():
    T, S, W = 50, 70, 9
    off = S - T

    def mod(b, h, qi, ki):
        return (ki <= qi + off) & (ki > qi + off - W)

    lay = build_layout(mod, T, S, block=(8, 16))
    dense = mod(0, 0, torch.arange(T)[:, None], torch.arange(S)[None])
    for n in range(lay.n_q_blocks):
        visited = {int(b): bool(p) for b, p in zip(lay.kv_blocks[0, 0, n], lay.partial[0, 0, n]) if b >= 0}
        for m in range(lay.n_k_blocks):
            tile = dense[n * 8 : (n + 1) * 8, m * 16 : (m + 1) * 16]
            if not tile.any():
                assert m not in visited
            elif tile.all() and (m + 1) * 16 <= S:
                assert visited[m] is False  # full: runs without a mask
            else:
                assert visited[m] is True
    assert lay.allowed_count() == int(dense.sum())


def test_merge_lse_is_exact_and_handles_empty_sides():
    q, k, v = torch.randn(3, 1, 1, 5, 4, dtype=torch.float64)
    k2, v2 = torch.randn(2, 1, 1, 7, 4, dtype=torch.float64)
    a = attnlab.attention_lse(q, k, v)
    b = attnlab.attention_lse(q, k2, v2)
    merged = merge_lse(a.out, a.lse, b.out, b.lse)
    whole = attnlab.attention_lse(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    torch.testing.assert_close(merged.out, whole.out)
    torch.testing.assert_close(merged.lse, whole.lse)
    empty = torch.full_like(a.lse, float("-inf"))
    m = merge_lse(a.out, a.lse, torch.zeros_like(a.out), empty)
    torch.testing.assert_close(m.out, a.out)
    m = merge_lse(torch.zeros_like(a.out), empty, torch.zeros_like(a.out), empty)
    assert (m.out == 0).all() and torch.isneginf(m.lse).all()


def test_no_fast_path_materializes_t_by_s(monkeypatch):
    # Gathers and masks are chunked to a fixed element budget; shrink it so T*S would stand out.
    monkeypatch.setattr(attnlab.kernels.plan, "_CHUNK_ELEMS", 1 << 16)
    monkeypatch.setattr(attnlab.kernels.plan, "_plans", weakref.WeakKeyDictionary())  # plan afresh
    T = 2048
    q = torch.randn(1, 2, T, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, T, 16, requires_grad=True) for _ in range(2))
    cases = {
        "sliding_window": dict(causal=True, window=128),
        "streaming": dict(causal=True, sinks=4, window=64),
        "neighborhood": dict(shape=(32, 64), kernel_size=(5, 7)),
        "halo": dict(shape=(32, 64), block_size=8, halo=2),
        "document": dict(causal=True, lengths=(512, 1024, 512)),
        "prefix_lm": dict(causal=True, prefix=100),
        "dense": dict(causal=True),
    }
    for name, opts in cases.items():
        attnlab.get(name).block_layout(T, T, **opts)  # building the layout is bounded separately
        with LargestTensor() as probe:
            out = attnlab.attention(q, k, v, name, **opts)
            out.sum().backward()
        assert probe.numel <= T * T // 8, (name, probe.numel)  # one query block x all keys is fine


def test_peak_working_set_grows_linearly_with_length():
    def largest(T):
        q, k, v = (torch.randn(1, 1, T, 16) for _ in range(3))
        with LargestTensor() as probe:
            attnlab.attention(q, k, v, "sliding_window", causal=True, window=64)
        return probe.numel

    assert largest(4096) <= 2.2 * largest(2048)


def test_gqa_folding_and_dv_padding_against_oracle_many_blocks():
    q = torch.randn(2, 6, 45, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 61, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 61, 5, dtype=torch.float64)

    def mod(b, h, qi, ki):
        return ((qi * 7 + ki * 3) % 5 != 0) & (ki % 11 != h)  # irregular, per-kv-head, some rows empty

    lay = build_layout(mod, 45, 61, heads=2, block=(8, 8))
    out, lse = block_sparse_attention(q, k, v, lay)
    allowed = torch.stack([mod(0, h, torch.arange(45)[:, None], torch.arange(61)[None]) for h in (0, 0, 0, 1, 1, 1)])
    ref = attnlab.reference.attention(q, k, v, allowed)
    torch.testing.assert_close(out, ref.out)
    torch.testing.assert_close(lse, ref.lse)


def test_block_size_context_is_respected():
    with block_size(32, 16):
        lay = attnlab.get("sliding_window").block_layout(100, 100, causal=True, window=8)
    assert (lay.block_q, lay.block_k) == (32, 16)
    lay = attnlab.get("sliding_window").block_layout(100, 100, causal=True, window=8)
    assert (lay.block_q, lay.block_k) == attnlab.kernels.block_sizes()


def test_causal_staircases_run_as_squares_and_stay_exact():
    from attnlab.kernels import plan as plan_mod

    with block_size(8, 8):
        lay = attnlab.get("prefix_lm").block_layout(80, 80, causal=True, prefix=20)
        plan = plan_mod._plan(lay, 1, 1)
        assert any(g.square for g in plan)
        q = torch.randn(2, 6, 80, 8, dtype=torch.float64)
        k, v = torch.randn(2, 2, 2, 80, 8, dtype=torch.float64)
        from attnlab.testing import compare_to_reference

        assert not compare_to_reference("prefix_lm", q, k, v, causal=True, prefix=20)
        assert not compare_to_reference("dense", q, k, v, impl="blocksparse", causal=True)


def test_interval_blocks_match_brute_force_tiles():
    from attnlab.kernels.layout import interval_blocks

    g = torch.Generator().manual_seed(0)
    for T, S, Bq, Bk in ((37, 70, 8, 16), (64, 64, 16, 8), (5, 130, 4, 32)):
        # disjoint intervals per row: sorted random cut points, every other gap kept
        cuts = torch.randint(0, S + 1, (T, 10), generator=g).sort(1).values
        lo, hi = cuts[:, 0::2], cuts[:, 1::2]
        dense = torch.zeros(T, S, dtype=torch.bool)
        for i in range(T):
            for a, b in zip(lo[i].tolist(), hi[i].tolist()):
                dense[i, a:b] = True
        visited, full = interval_blocks(lo, hi, S, (Bq, Bk))
        want_v, want_f = tile_classes(dense, Bq, Bk)
        assert torch.equal(visited, want_v)
        assert torch.equal(full, want_f)


@contextlib.contextmanager
def _executor_path(area: int):
    """Selections up to this per-slice area take the gathered path (-1: none, the planned path);
    a context manager rather than monkeypatch, which hypothesis tests cannot use per example."""
    old, gathered._SMALL_SLICE_AREA = gathered._SMALL_SLICE_AREA, area
    try:
        yield
    finally:
        gathered._SMALL_SLICE_AREA = old


def _random_selection_layout(g, Bl, Hl, T, S, blk):
    """A per-slice layout as a selection makes one: random visited blocks, some of them full, an
    irregular per-slice predicate on the partial ones (some rows end up with no key)."""
    from attnlab.kernels.layout import layout_from_blocks

    nQB, nKB = -(-T // blk[0]), -(-S // blk[1])
    visited = torch.rand(Bl, Hl, nQB, nKB, generator=g) < 0.5
    full = visited & (torch.rand(Bl, Hl, nQB, nKB, generator=g) < 0.5)

    def mod(b, h, qi, ki):
        return (qi * 5 + ki * 3 + b + 2 * h) % 4 != 0

    rows = torch.arange(T) // blk[0]
    cols = torch.arange(S) // blk[1]
    lay = layout_from_blocks(visited, full, T, S, blk, mod, selected=True)
    tok = visited[:, :, rows][..., cols]  # [Bl, Hl, T, S]
    qi, ki = torch.arange(T)[:, None], torch.arange(S)[None]
    pred = torch.stack([torch.stack([mod(b, h, qi, ki) for h in range(Hl)]) for b in range(Bl)])
    full_tok = full[:, :, rows][..., cols] & ((cols + 1) * blk[1] <= S)  # full blocks are unmasked
    return lay, tok & (full_tok | pred)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    T=st.integers(1, 40),
    S=st.integers(1, 40),
    blk=st.tuples(st.sampled_from([4, 8, 16]), st.sampled_from([4, 8, 16])),
    per_batch=st.booleans(),
    per_head=st.booleans(),
    Dv=st.sampled_from([8, 5]),
    seed=st.integers(0, 10**6),
)
def test_gathered_and_planned_paths_match_the_oracle_on_selection_layouts(
    B, heads, T, S, blk, per_batch, per_head, Dv, seed
):
    """Both executor paths for per-slice layouts (per batch row or shared, per kv head or shared),
    forward and gradients, against the dense oracle."""

    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    lay, allowed = _random_selection_layout(g, B if per_batch else 1, Hkv if per_head else 1, T, S, blk)
    allowed = allowed.expand(B, Hkv, T, S).repeat_interleave(H // Hkv, dim=1)  # [B, H, T, S]
    q = torch.randn(B, H, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    ref = attnlab.reference.attention(q, k, v, allowed)
    want = torch.autograd.grad(ref.out.sum(), (q, k, v))
    for area in (-1, 1 << 40):  # planned, then gathered
        with _executor_path(area):
            out, lse = block_sparse_attention(q, k, v, lay)
            got = torch.autograd.grad(out.sum(), (q, k, v))
        torch.testing.assert_close(out, ref.out)
        torch.testing.assert_close(lse, ref.lse)
        assert (out[~allowed.any(-1)] == 0).all()  # a row with no key is 0, not NaN
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_small_selection_layouts_take_the_gathered_path_in_one_batched_call(monkeypatch):
    """The gathered path launches O(1) kernel calls for a whole batch of per-slice layouts (the
    planned one launches at least one per slice) and bounds its calls to the chunk budget."""
    calls = []
    real = gathered.cpu_flash
    monkeypatch.setattr(gathered, "cpu_flash", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q, k, v = (torch.randn(32, 1, 64, 16) for _ in range(3))
    attnlab.attention(q, k, v, "block_topk", causal=True, block_size=8, top_k=3, init_blocks=1, local_blocks=1)
    assert len(calls) == 1 and calls[0][1] == 32 * 8  # every (batch row, query block) in one call
    monkeypatch.setattr(gathered, "_CHUNK_ELEMS", 1 << 12)
    calls.clear()
    attnlab.attention(q, k, v, "block_topk", causal=True, block_size=8, top_k=3, init_blocks=1, local_blocks=1)
    assert len(calls) > 1 and all(s[1] * 24 * (16 + 8) <= 1 << 12 for s in calls)


def test_only_small_selections_take_the_gathered_path():
    """Static per-head layouts keep their cached plans; selections go batched while small."""
    static = attnlab.get("strided_shard").block_layout(256, 256, causal=True, kv_heads=4)
    assert static.kv_blocks.shape[1] == 4 and not static.selected and not gathered.suits(static, 1)
    q, k = torch.randn(2, 1, 4, 256, 16)
    small = attnlab.get("block_topk").select(q, k, causal=True, block_size=16, top_k=4, local_blocks=1)
    assert small.layout.selected and gathered.suits(small.layout, 1)
    q, k = torch.randn(2, 1, 4, 8192, 16)
    large = attnlab.get("block_topk").select(q, k, causal=True)  # 8K rows x 16 blocks of 64: planned
    assert not gathered.suits(large.layout, 1)


def test_gathered_path_in_bf16_matches_the_planned_path():

    g = torch.Generator().manual_seed(3)
    lay, _ = _random_selection_layout(g, 2, 2, 37, 45, (8, 8))
    q = torch.randn(2, 4, 37, 16, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, 45, 16, generator=g).bfloat16().requires_grad_() for _ in range(2))
    results = []
    for area in (-1, 1 << 40):
        with _executor_path(area):
            out, lse = block_sparse_attention(q, k, v, lay)
            results.append((out, lse, *torch.autograd.grad(out.float().sum(), (q, k, v))))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_gathered_path_keeps_only_chunk_sized_masks(monkeypatch):
    """The whole batch's [R, rows, V*Bk] mask never exists: chunks build theirs from the partial
    blocks' predicate, so the largest tensor stays q-sized while the full mask would be 8x q."""
    monkeypatch.setattr(gathered, "_CHUNK_ELEMS", 1 << 14)
    q, k, v = (torch.randn(32, 1, 512, 16, requires_grad=True) for _ in range(3))
    opts = dict(causal=True, block_size=16, top_k=8, init_blocks=1, local_blocks=1)
    sel = attnlab.get("block_topk").select(q, k, **opts)
    assert gathered.suits(sel.layout, 1)
    full_mask = 32 * 512 * 8 * 16  # R * rows * V * Bk
    with LargestTensor() as probe:
        out = attnlab.attention(q, k, v, "block_topk", selection=sel, **opts)
        out.sum().backward()
    assert probe.numel <= q.numel() < full_mask // 4, (probe.numel, q.numel())

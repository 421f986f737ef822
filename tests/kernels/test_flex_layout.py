"""The CUDA path's logic, checked on CPU: FlexAttention over a BlockMask built from our own layout.

Three views, because Flex on CPU comes in two partial forms (torch 2.13): eager Flex evaluates the
predicate densely and ignores the block lists (it checks the predicate as Flex calls it: head and
batch mapping, tile order, LSE, padding), while compiled Flex follows the block lists but runs
inference only, without the LSE. So (1) the BlockMask's exact semantics (full blocks unmasked,
partial blocks under the predicate, nothing else) are evaluated here and compared with the dense
mask of every mechanism, (2) every mechanism runs through the executor's Flex path in eager mode
against the dense oracle, and (3) one compiled run on a selection-style layout, whose result
depends on the block lists alone, matches the oracle.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

import attnlab
from attnlab.kernels import block_size, block_sparse_attention, flex
from attnlab.kernels.flex import flex_on_cpu, layout_block_mask
from attnlab.kernels.layout import layout_from_blocks
from attnlab.mechanisms import document
from attnlab.reference import query_head_mask
from attnlab.testing import attention_output

MASK_MECHS = [m.name for m in attnlab.registry.MECHANISMS if m.layout is not None]
SIZES = {"self": (36, 36), "self_causal": (36, 36), "cross": (37, 53), "cross_causal": (37, 53)}
HEADS = [(2, 2), (4, 2)]  # MHA, GQA


@pytest.fixture(autouse=True)
def _flex_without_dynamo(monkeypatch):
    """Eager Flex re-traces each new predicate with dynamo (seconds per mechanism on 2 cores);
    its debug switch runs the same dense math directly. The compiled test below traces for real."""
    monkeypatch.setattr(torch_flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def _dense_from_block_mask(bm, B: int, H: int) -> torch.Tensor:
    """What Flex computes under ``bm``, as bool [B, H, T, S]: a key is allowed when its block is in
    the row block's full list, or in its partial list and the predicate allows it."""
    T, S = bm.seq_lengths
    Bq, Bk = bm.BLOCK_SIZE
    nKB = bm.kv_indices.shape[-1]

    def blocks(num, idx):  # [Bm, Hm, nQB, nKB] bool from Flex's (num, indices) lists
        slot = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
        out = torch.zeros(*idx.shape[:-1], nKB + 1, dtype=torch.bool)
        return out.scatter(-1, torch.where(slot, idx, nKB).long(), True)[..., :nKB]

    part, full = blocks(bm.kv_num_blocks, bm.kv_indices), blocks(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (part & full).any(), "a block is both partial and full"
    rq, rk = torch.arange(T) // Bq, torch.arange(S) // Bk
    q_idx, kv_idx = torch.arange(T).view(-1, 1), torch.arange(S).view(1, -1)
    out = torch.zeros(B, H, T, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            bb, hh = min(b, part.shape[0] - 1), min(h, part.shape[1] - 1)
            p, f = part[bb, hh][rq][:, rk], full[bb, hh][rq][:, rk]
            pred = bm.mask_mod(torch.tensor(b), torch.tensor(h), q_idx, kv_idx)
            out[b, h] = f | (p & pred)
    return out


def _oracle_mask(name: str, T: int, S: int, causal: bool, B: int, H: int, Hkv: int, opts: dict) -> torch.Tensor:
    """The mechanism's dense mask as bool [B, H, T, S] (per kv head patterns repeated over groups)."""
    m = attnlab.mask(name, T, S, causal=causal, kv_heads=Hkv, **opts)  # [B|1, Hkv|1, T, S]
    return query_head_mask(m, H).expand(B, H, *m.shape[2:])


def _cases():
    for name in MASK_MECHS:
        for pat in sorted(attnlab.get(name).patterns):
            yield name, pat


@pytest.mark.parametrize("name,pattern", list(_cases()))
def test_block_mask_is_the_mechanisms_mask(name, pattern):
    """Flex's semantics of our BlockMask equal the dense mask, for every mask mechanism."""
    mech = attnlab.get(name)
    T, S = SIZES[pattern]
    causal, B = pattern.endswith("causal"), 2
    opts = mech.example(S)
    for H, Hkv in HEADS:
        with block_size(16):
            lay = mech.block_layout(T, S, causal=causal, kv_heads=Hkv, **opts)
        bm = layout_block_mask(lay, B, H, "cpu")
        want = _oracle_mask(name, T, S, causal, B, H, Hkv, opts)
        if lay.order is not None:  # the block mask describes the tile-ordered sequence
            want = want[:, :, lay.order][..., lay.order]
        assert torch.equal(_dense_from_block_mask(bm, B, H), want), f"{name} {pattern} H={H} Hkv={Hkv}"
        # coarsened to larger Flex blocks (as on CUDA, where they are multiples of 128): still exact
        coarse = layout_block_mask(lay, B, H, "cpu", block=(2 * lay.block_q, 3 * lay.block_k))
        assert coarse.BLOCK_SIZE == (2 * lay.block_q, 3 * lay.block_k)
        assert torch.equal(_dense_from_block_mask(coarse, B, H), want), f"coarse {name} {pattern} H={H}"
        # Flex's block-level view: exactly the layout's visited blocks
        visited = torch.zeros(*lay.kv_blocks.shape[:3], lay.n_k_blocks + 1, dtype=torch.bool)
        visited = visited.scatter(-1, torch.where(lay.kv_blocks >= 0, lay.kv_blocks, lay.n_k_blocks), True)
        visited = visited[..., :-1].repeat_interleave(H // Hkv if lay.kv_blocks.shape[1] > 1 else 1, dim=1)
        assert torch.equal(bm.to_dense().bool(), visited)


@pytest.mark.parametrize("name,pattern", list(_cases()) + [("global_local", "self_causal"), ("global_local", "cross")])
def test_flex_path_matches_the_oracle(name, pattern):
    """The executor's Flex path (eager Flex on CPU) equals the dense oracle, output and LSE."""
    mech = attnlab.get(name)
    T, S = SIZES[pattern]
    causal = pattern.endswith("causal")
    impl = "blocksparse" if name == "dense" else "auto"
    torch.manual_seed(0)
    for H, Hkv in HEADS:
        q, k, v = (torch.randn(2, h, n, 16, dtype=torch.float64) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
        with block_size(16), flex_on_cpu("eager"):
            got = attention_output(q, k, v, name, causal=causal, impl=impl, **mech.example(S))
        ref = attention_output(q, k, v, name, causal=causal, impl="reference", **mech.example(S))
        torch.testing.assert_close(got.out, ref.out, atol=1e-10, rtol=1e-10)
        if ref.lse is not None:
            torch.testing.assert_close(got.lse, ref.lse, atol=1e-10, rtol=1e-10)


def test_the_flex_path_runs_flex(monkeypatch):
    """flex_on_cpu really routes the executor through the Flex bridge (else the tests above would
    silently compare the CPU path)."""
    calls = []
    real = flex.flex_attention
    monkeypatch.setattr(attnlab.kernels, "flex_attention", lambda *a: calls.append(1) or real(*a))
    q = k = v = torch.randn(1, 2, 40, 16)
    with flex_on_cpu("eager"):
        attnlab.attention(q, k, v, "sliding_window", causal=True, window=7)
    attnlab.attention(q, k, v, "sliding_window", causal=True, window=7)
    assert len(calls) == 1


def test_block_mask_is_cached_and_moved_once(monkeypatch):
    builds = []
    real = flex._build_block_mask
    monkeypatch.setattr(flex, "_build_block_mask", lambda *a: builds.append(1) or real(*a))
    ids = torch.tensor([0] * 20 + [1] * 21)
    with block_size(16):
        lay = attnlab.get("document").block_layout(41, 41, causal=True, document_ids=ids)
    q = k = v = torch.randn(1, 2, 41, 16)
    with flex_on_cpu("eager"):
        first = attnlab.attention(q, k, v, "document", causal=True, document_ids=ids)
        with block_size(16):
            second = attnlab.attention(q, k, v, "document", causal=True, document_ids=ids)
            third = attnlab.attention(q, k, v, "document", causal=True, document_ids=ids)
    assert torch.equal(second, third) and first.shape == second.shape
    assert layout_block_mask(lay, 1, 2, "cpu") is layout_block_mask(lay, 1, 8, "cpu")  # shared heads: one mask
    assert layout_block_mask(lay, 1, 2, "cpu") is layout_block_mask(lay, 3, 2, "cpu")  # shared batch too
    assert len(builds) == 2  # one per layout (64- and 16-blocks), none for the repeated calls


def test_cuda_sparse_blocks_are_multiples_of_128():
    def lay(bq, bk):
        with block_size(bq, bk):
            return attnlab.get("dense").block_layout(300, 300)

    assert flex.sparse_block(lay(64, 64), "cuda") == (128, 128)
    assert flex.sparse_block(lay(48, 256), "cuda") == (384, 256)
    assert flex.sparse_block(lay(48, 16), "cpu") == (48, 16)
    with pytest.raises(ValueError, match="whole multiples"):
        layout_block_mask(lay(48, 16), 1, 1, "cpu", block=(64, 32))


def test_small_head_dims_are_padded_exactly():
    assert [flex._flex_head_dim(d) for d in (1, 8, 16, 17, 64, 80, 128)] == [16, 16, 16, 32, 64, 128, 128]
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 29, 8), torch.randn(1, 2, 29, 8), torch.randn(1, 2, 29, 12)
    with block_size(16), flex_on_cpu("eager"):
        got = attnlab.attention_lse(q, k, v, "sliding_window", causal=True, scale=0.3, window=6)
    ref = attnlab.attention_lse(q, k, v, "sliding_window", causal=True, scale=0.3, window=6, impl="reference")
    assert got.out.shape == (1, 4, 29, 12)
    torch.testing.assert_close(got.out, ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-5, rtol=1e-5)


def test_rows_with_no_key_give_zero_and_minus_inf():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    with block_size(16), flex_on_cpu("eager"):
        out, lse = attnlab.attention_lse(q, k, v, "dense", causal=True, impl="blocksparse")
    empty = torch.arange(37) < 37 - 20  # bottom-right causal: rows before the first key see nothing
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    ref = attnlab.attention_lse(q, k, v, "dense", causal=True, impl="reference")
    torch.testing.assert_close(out, ref.out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flex_path", [False, True])
def test_a_layout_with_no_block_at_all(flex_path):
    """Rules that allow nothing: the layout visits no block (V = 0) and every row is empty."""
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    opts = {"groups": torch.tensor([0] * 10 + [1] * 10), "rules": torch.zeros(2, 2, dtype=torch.bool)}
    assert attnlab.get("region").block_layout(20, 20, causal=True, **opts).kv_blocks.shape[-1] == 0
    with flex_on_cpu("eager") if flex_path else contextlib.nullcontext():
        out, lse = attnlab.attention_lse(q, k, v, "region", causal=True, **opts)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_bad_layouts_and_modes_are_refused():
    with block_size(16):
        ids = torch.zeros(2, 41, dtype=torch.long)
        lay = attnlab.get("document").block_layout(41, 41, causal=False, document_ids=ids)
    with pytest.raises(ValueError, match="layout has batch 2 but q has batch 3"):
        layout_block_mask(lay, 3, 2, "cpu")
    with pytest.raises(ValueError, match="mode must be"):
        with flex_on_cpu("fast"):
            pass


def _selection_layout(B: int, Hkv: int, T: int, S: int, blk: int):
    """A selection-style layout: random visited / full blocks per (batch, kv head), with a document
    predicate reading per-batch ids on partial blocks; only the block lists say what is kept."""
    g = torch.Generator().manual_seed(3)
    nQB, nKB = math.ceil(T / blk), math.ceil(S / blk)
    visited = torch.rand(B, Hkv, nQB, nKB, generator=g) < 0.5
    visited[:, :, :, 0] = True
    full = torch.rand(B, Hkv, nQB, nKB, generator=g) < 0.5
    ids = (torch.arange(S) >= S // 2).long().repeat(B, 1)
    ids[1, : S // 3] = 2
    mod = document._mask_mod(ids, S - T, False)
    return layout_from_blocks(visited, full, T, S, (blk, blk), mod, selected=True)


def test_selection_layout_on_compiled_flex(monkeypatch):
    """Compiled Flex on CPU runs a selection layout exactly, coarsened as on CUDA (16-blocks in
    32-blocks, 64 in 128 there): the compiled kernel traces the per-block state lookup, and a block
    missing from our lists, or a partial one listed as full, would change the result."""
    monkeypatch.setattr(torch_flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", False)
    monkeypatch.setattr(flex, "sparse_block", lambda layout, device: (32, 32))
    B, H, Hkv, T, S = 2, 4, 2, 37, 53
    lay = _selection_layout(B, Hkv, T, S, 16)
    bm = layout_block_mask(lay, B, H, "cpu")
    assert bm.BLOCK_SIZE == (32, 32)
    want = torch.zeros(B, H, T, S, dtype=torch.bool)  # the layout's own meaning, block by block
    for b in range(B):
        for h in range(H):
            for n in range(lay.n_q_blocks):
                for j, part in zip(lay.kv_blocks[b, h // 2, n].tolist(), lay.partial[b, h // 2, n].tolist()):
                    if j < 0:
                        continue
                    rows, cols = torch.arange(n * 16, min(n * 16 + 16, T)), torch.arange(j * 16, min(j * 16 + 16, S))
                    ok = lay.mask_mod(torch.tensor(b), torch.tensor(h // 2), rows.view(-1, 1), cols.view(1, -1))
                    want[b, h, rows.view(-1, 1), cols.view(1, -1)] = ok if part else True
    assert torch.equal(_dense_from_block_mask(bm, B, H), want)
    torch.manual_seed(4)
    q, k, v = torch.randn(B, H, T, 16), torch.randn(B, Hkv, S, 16), torch.randn(B, Hkv, S, 16)
    ref = attnlab.reference.attention(q, k, v, want)
    with flex_on_cpu("compiled"):
        out, lse = block_sparse_attention(q, k, v, lay)
    torch.testing.assert_close(out, ref.out, atol=1e-5, rtol=1e-5)
    assert torch.isnan(lse).all()  # compiled Flex on CPU returns no LSE (torch 2.13): marked unknown
    cpu_out, _ = block_sparse_attention(q, k, v, lay)  # our CPU path agrees too
    torch.testing.assert_close(cpu_out, ref.out, atol=1e-5, rtol=1e-5)

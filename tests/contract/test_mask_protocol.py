"""The protocol every mask mechanism follows: keyword-only options whose defaults live only in the
record, one layout function for the executor and ``block_layout``, dense masks always
[B|1, Hkv|1, T, S], and one expansion of them to query heads."""

import inspect

import pytest
import torch

import attnlab
from attnlab import reference
from attnlab.kernels import block_size
from attnlab.reference import query_head_mask
from attnlab.spec import Kind

WITH_LAYOUT = [m for m in attnlab.registry.MECHANISMS if m.layout is not None]
WITH_MASK = [m for m in attnlab.registry.MECHANISMS if m.mask is not None]


@pytest.mark.parametrize("mech", WITH_LAYOUT, ids=lambda m: m.name)
def test_mask_and_layout_take_keyword_options_without_defaults(mech):
    heads = {"kv_heads"} if mech.per_kv_head else set()
    for fn, fixed in ((mech.mask, {"causal"}), (mech.layout, {"causal", "block"})):
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["T", "S"], fn
        keyword = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(keyword) == fixed | heads | set(mech.defaults), fn  # every option, nothing else
        assert all(p.default is inspect.Parameter.empty for p in keyword.values()), f"{fn}: defaults live in DEFAULTS"


def test_every_mask_record_runs_the_generic_executor_impl_and_keeps_its_impl_names():
    for mech in attnlab.registry.MECHANISMS:
        if mech.kind is Kind.MASK:
            assert mech.impls["blocksparse"].fn == mech.blocksparse, mech.name
    assert list(attnlab.get("dense").impls) == ["sdpa", "blocksparse"]  # impl="auto" still prefers SDPA
    assert "blocksparse" in attnlab.get("multiscale").impls  # its own impl: pools k and v first


@pytest.mark.parametrize("name", ["sliding_window", "strided_shard", "document", "neighborhood"])
def test_the_impl_and_block_layout_use_the_same_layout(name):
    mech = attnlab.get(name)
    S = 24
    opts = mech.example(S)
    q = torch.randn(2, 4, S, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, S, 8, dtype=torch.float64)
    with block_size(8):
        lay = mech.block_layout(S, S, causal=False, kv_heads=2, **opts)
        resolved = mech.resolve(S, S, False, opts)
        heads = {"kv_heads": 2} if mech.per_kv_head else {}
        # the protocol call the impl makes, for q's device and tiles: the very same (cached) layout
        assert mech.layout(S, S, causal=False, block=(8, 8), device=q.device, **heads, **resolved) is lay
        got = attnlab.attention(q, k, v, name, impl="blocksparse", **opts)
    torch.testing.assert_close(got, attnlab.attention(q, k, v, name, impl="reference", **opts))


def test_layouts_are_cached_per_options_and_rebuilt_after_an_in_place_edit():
    mech = attnlab.get("document")
    ids = torch.tensor([0] * 10 + [1] * 14)
    first = mech.block_layout(24, 24, causal=True, document_ids=ids)
    assert mech.block_layout(24, 24, causal=True, document_ids=ids) is first
    assert mech.block_layout(24, 24, causal=False, document_ids=ids) is not first
    ids[12:] = 2  # the same tensor, edited: a new layout
    assert mech.block_layout(24, 24, causal=True, document_ids=ids) is not first


@pytest.mark.parametrize("mech", WITH_MASK, ids=lambda m: m.name)
def test_every_dense_mask_is_4d(mech):
    S = 24
    opts = mech.example(S)
    for causal in (False, True):
        if attnlab.registry.pattern(S, S, causal) not in mech.patterns:
            continue
        m = attnlab.mask(mech.name, S, S, causal=causal, kv_heads=3, **opts)
        assert m.dtype == torch.bool and m.dim() == 4 and m.shape[0] == 1 and m.shape[2] == S
        assert m.shape[1] == (3 if mech.per_kv_head else 1)


def test_per_batch_and_per_head_masks_keep_their_axes():
    ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    assert attnlab.mask("document", 12, 12, document_ids=ids).shape == (2, 1, 12, 12)
    assert attnlab.mask("region", 12, 12, groups=ids, rules=torch.eye(2, dtype=torch.bool)).shape == (2, 1, 12, 12)
    assert attnlab.mask("strided_shard", 12, 12, causal=True, kv_heads=2, block_size=2).shape == (1, 2, 12, 12)


def test_query_head_mask_follows_grouped_query_attention():
    m = attnlab.mask("strided_shard", 16, 16, causal=True, kv_heads=2, block_size=2, local_blocks=1)
    assert not torch.equal(m[0, 0], m[0, 1])
    per_query = query_head_mask(m, 6)
    assert per_query.shape == (1, 6, 16, 16)
    for i in range(6):  # query head i uses kv head i // (H // Hkv)
        assert torch.equal(per_query[0, i], m[0, i // 3])
    shared = attnlab.mask("sliding_window", 16, 16, window=3)
    assert query_head_mask(shared, 6) is shared  # [1, 1, T, S] broadcasts over any number of heads
    with pytest.raises(ValueError, match="must divide the 5 query heads"):
        query_head_mask(m, 5)
    with pytest.raises(ValueError, match=r"mask must be \[B\|1, Hkv\|1, T, S\]"):
        query_head_mask(m[0], 6)


def test_reference_under_the_4d_mask_is_per_head_attention():
    """Independent of the record: each query head attends under its own kv head's pattern."""
    q = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 20, 8, dtype=torch.float64)
    m = attnlab.mask("strided_shard", 20, 20, causal=True, kv_heads=2, block_size=3, local_blocks=1)
    got = reference.attention(q, k, v, query_head_mask(m, 4)).out
    for i in range(4):
        kv = slice(i // 2, i // 2 + 1)
        want = reference.attention(q[:, i : i + 1], k[:, kv], v[:, kv], m[0, i // 2]).out
        torch.testing.assert_close(got[:, i : i + 1], want)
    torch.testing.assert_close(
        got, attnlab.attention(q, k, v, "strided_shard", causal=True, block_size=3, local_blocks=1)
    )


def test_per_batch_options_must_match_q_batch():
    ids = torch.zeros(2, 12, dtype=torch.long)
    q = k = v = torch.randn(3, 1, 12, 8)
    with pytest.raises(ValueError, match="groups has batch 2 but q has batch 3"):
        attnlab.attention(q, k, v, "region", groups=ids)


def test_selections_and_mixtures_have_no_dense_mask():
    with pytest.raises(ValueError, match="depends on q and k"):
        attnlab.mask("block_topk", 8, 8)
    with pytest.raises(ValueError, match="no single mask"):
        attnlab.mask("global_local", 8, 8)

"""Property tests: hypothesis fuzzes shapes, options and block sizes against the oracle."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.kernels import block_size
from attnlab.testing import compare_to_reference

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensors(B, H, Hkv, T, S, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64),
    )


shapes = st.tuples(
    st.integers(1, 2),
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 10**6),
)
blocks = st.tuples(st.sampled_from([4, 8, 16, 64]), st.sampled_from([4, 8, 16, 64]))


@SETTINGS
@given(shape=shapes, blk=blocks, causal=st.booleans(), window=st.integers(1, 50))
def test_sliding_window(shape, blk, causal, window):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    with block_size(*blk):
        assert not compare_to_reference(
            "sliding_window", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=causal, window=window
        )


@SETTINGS
@given(shape=shapes, blk=blocks, causal=st.booleans(), sinks=st.integers(0, 8), window=st.integers(1, 20))
def test_streaming(shape, blk, causal, sinks, window):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    with block_size(*blk):
        assert not compare_to_reference(
            "streaming", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=causal, sinks=sinks, window=window
        )


@SETTINGS
@given(shape=shapes, blk=blocks, causal=st.booleans(), data=st.data())
def test_document(shape, blk, causal, data):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    cuts = sorted(data.draw(st.sets(st.integers(1, S - 1), max_size=5))) if S > 1 else []
    lengths = tuple(b - a for a, b in zip([0, *cuts], [*cuts, S]))
    with block_size(*blk):
        assert not compare_to_reference(
            "document", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=causal, lengths=lengths
        )


@SETTINGS
@given(dims=st.lists(st.integers(2, 7), min_size=1, max_size=3), blk=blocks, data=st.data(), seed=st.integers(0, 999))
def test_neighborhood(dims, blk, data, seed):
    dilation = tuple(data.draw(st.integers(1, max(1, n // 2))) for n in dims)
    kernel = tuple(data.draw(st.integers(1, n // d)) for n, d in zip(dims, dilation))
    causal = tuple(data.draw(st.booleans()) for _ in dims)
    T = int(torch.tensor(dims).prod())
    with block_size(*blk):
        assert not compare_to_reference(
            "neighborhood",
            *tensors(1, 2, 1, T, T, 4, 4, seed),
            causal=causal,
            shape=tuple(dims),
            kernel_size=kernel,
            dilation=dilation,
        )


@SETTINGS
@given(shape=shapes, blk=blocks, data=st.data())
def test_prefix_lm_and_dense(shape, blk, data):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    prefix = data.draw(st.integers(0, S))
    q, k, v = tensors(B, H, Hkv, T, S, D, Dv, seed)
    with block_size(*blk):
        assert not compare_to_reference("prefix_lm", q, k, v, causal=True, prefix=prefix)
        assert not compare_to_reference("dense", q, k, v, impl="blocksparse", causal=data.draw(st.booleans()))
    assert attnlab.attention(q, k, v, "prefix_lm", causal=True, prefix=S).shape == (B, H, T, Dv)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_strided_shard(shape, data):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    opts = {
        "block_size": data.draw(st.integers(1, 8)),
        "local_blocks": data.draw(st.integers(1, 4)),
        "vert_stride": data.draw(st.integers(1, 5)),
        "dense_heads": data.draw(st.integers(0, Hkv)),
    }
    causal = data.draw(st.booleans())
    assert not compare_to_reference("strided_shard", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=causal, **opts)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_block_topk(shape, data):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    init, local = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    opts = {
        "block_size": data.draw(st.integers(1, 8)),
        "init_blocks": init,
        "local_blocks": local,
        "top_k": data.draw(st.integers(max(1, init + local), 6)),
    }
    causal = data.draw(st.booleans())
    assert not compare_to_reference("block_topk", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=causal, **opts)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_dynamic_hierarchical_fixed_chunks(shape, data):
    B, (H, Hkv), T, S, D, Dv, seed = shape
    opts = {
        "chunking": "fixed",
        "chunk_size": data.draw(st.integers(1, 9)),
        "budget": data.draw(st.integers(1, 30)),
        "local": data.draw(st.integers(0, 6)),
        "sinks": data.draw(st.integers(0, 4)),
    }
    assert not compare_to_reference("dynamic_hierarchical", *tensors(B, H, Hkv, T, S, D, Dv, seed), causal=True, **opts)

"""S2-Attention invariants: the block rule, head-union coverage, dense heads, full local band."""

import torch

import attnlab


def spec_keep(h, i, j, T, S, causal, beta, local, stride, step, dense):
    p = i + S - T
    if p < 0 or (causal and j > p):
        return False
    I, J = p // beta, j // beta
    near = (I - J < local) if causal else abs(I - J) < local
    return dense or near or (J + h * step) % stride == 0


def test_mask_equals_block_rule():
    for T, S, causal in ((23, 23, True), (9, 23, True), (23, 23, False), (30, 17, False)):
        m = attnlab.mask(
            "strided_shard", T, S, causal=causal, kv_heads=3, block_size=3, local_blocks=2, vert_stride=4, dense_heads=1
        )
        for h in range(3):
            want = torch.tensor(
                [[spec_keep(h, i, j, T, S, causal, 3, 2, 4, 1, h == 2) for j in range(S)] for i in range(T)]
            )
            assert torch.equal(m[0, h], want)


def test_union_of_heads_covers_every_causal_position():
    T, heads, stride = 64, 4, 4  # H' >= v with head_step 1
    m = attnlab.mask(
        "strided_shard", T, T, causal=True, kv_heads=heads, block_size=4, local_blocks=1, vert_stride=stride
    )
    assert m.shape == (1, heads, T, T)  # [1, kv_heads, T, S]
    assert torch.equal(m[0].any(0), torch.ones(T, T, dtype=torch.bool).tril())
    assert not torch.equal(m[0, 0], m[0, 1])  # the shards really differ per head


def test_dense_head_equals_dense_and_full_band_equals_causal():
    q = torch.randn(1, 4, 40, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 40, 8, dtype=torch.float64)
    out = attnlab.attention(q, k, v, "strided_shard", causal=True, block_size=4, local_blocks=2, dense_heads=1)
    dense = attnlab.attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, 2:], dense[:, 2:])  # kv head 1 (query heads 2, 3) is dense
    assert not torch.allclose(out[:, :2], dense[:, :2])
    band = attnlab.attention(q, k, v, "strided_shard", causal=True, block_size=4, local_blocks=10)
    torch.testing.assert_close(band, dense)


def test_per_head_layout_is_exposed():
    lay = attnlab.get("strided_shard").block_layout(256, 256, causal=True, kv_heads=4, block_size=16)
    assert lay.kv_blocks.shape[:2] == (1, 4) and lay.block_q == 16
    assert lay.allowed_count() == int(
        attnlab.mask("strided_shard", 256, 256, causal=True, kv_heads=4, block_size=16).sum()
    )

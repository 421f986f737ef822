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


def dkernel_block_mask(heads, kv_heads, blocks, local, stride, dense_heads):
    """DKernel's causal block rule (dkernel.utils.get_sparse_attn_mask), per kv head, written out by loops."""
    step = max(1, int(stride / heads))  # DKernel divides by the *query* heads
    out = torch.zeros(kv_heads, blocks, blocks, dtype=torch.bool)
    for h in range(kv_heads):
        for I in range(blocks):
            for J in range(I + 1):
                stripe = h >= kv_heads - dense_heads or (J + h * step) % stride == 0
                out[h, I, J] = I - J < local or stripe
    return out


def test_head_step_option_reproduces_dkernel_under_gqa():
    beta, blocks, stride = 2, 12, 8
    T = beta * blocks
    for heads, kv_heads, dense_heads in ((8, 2, 0), (8, 4, 1), (4, 4, 0), (16, 4, 0)):
        want_blocks = dkernel_block_mask(heads, kv_heads, blocks, 2, stride, dense_heads)
        want = want_blocks.repeat_interleave(beta, 1).repeat_interleave(beta, 2) & torch.ones(T, T).tril().bool()
        options = dict(causal=True, kv_heads=kv_heads, block_size=beta, local_blocks=2, vert_stride=stride)
        dkernel = attnlab.mask(
            "strided_shard", T, T, head_step=max(1, stride // heads), dense_heads=dense_heads, **options
        )
        assert torch.equal(dkernel[0], want)
        default = attnlab.mask("strided_shard", T, T, dense_heads=dense_heads, **options)
        # The default spreads the shifts over the kv heads: equal to DKernel under MHA only.
        assert torch.equal(default[0], want) == (heads == kv_heads)

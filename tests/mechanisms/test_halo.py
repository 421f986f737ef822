"""HaloNet blocked local attention: the block-plus-halo rule written out per pixel, the edge cases
(halo 0 is block-diagonal, a halo covering the image is global), the executor against the oracle
with gradients, and bad options naming the option."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def test_halo_mask_equals_spec():
    H, W, b, h = 8, 12, 4, 1
    m = _2d(attnlab.mask("halo", H * W, H * W, shape=(H, W), block_size=b, halo=h))
    for a in range(H * W):
        y, x = divmod(a, W)
        y0, x0 = y // b * b, x // b * b
        want = [j for j in range(H * W) if y0 - h <= j // W < y0 + b + h and x0 - h <= j % W < x0 + b + h]
        assert m[a].nonzero().flatten().tolist() == want
    # a halo covering the image with one block is global attention
    assert _2d(attnlab.mask("halo", 16, 16, shape=(4, 4), block_size=4, halo=0)).all()


def test_halo_zero_is_block_diagonal_over_image_blocks():
    H, W, b = 4, 6, 2
    m = _2d(attnlab.mask("halo", H * W, H * W, shape=(H, W), block_size=b, halo=0))
    block_of = [(a // W) // b * (W // b) + (a % W) // b for a in range(H * W)]  # image block of each pixel
    for a in range(H * W):
        assert m[a].nonzero().flatten().tolist() == [j for j in range(H * W) if block_of[j] == block_of[a]]
    assert (m.sum(1) == b * b).all()
    assert torch.equal(_2d(attnlab.mask("halo", 12, 12, shape=(3, 4), block_size=1, halo=0)), torch.eye(12, dtype=bool))


def test_a_halo_reaching_every_edge_is_global_attention():
    # blocks of 2 on a 4 x 6 grid: a halo of 4 reaches every pixel from every block
    assert _2d(attnlab.mask("halo", 24, 24, shape=(4, 6), block_size=2, halo=4)).all()
    assert not _2d(attnlab.mask("halo", 24, 24, shape=(4, 6), block_size=2, halo=3)).all()


def test_executor_matches_the_oracle_forward_and_gradients():
    opts = {"shape": (6, 8), "block_size": 2, "halo": 1}
    q = torch.randn(1, 4, 48, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 48, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with attnlab.kernels.block_size(16, 16):  # several query and key blocks in tile order
        got = attnlab.attention(q, k, v, "halo", **opts)
    want = attnlab.attention(q, k, v, "halo", impl="reference", **opts)
    torch.testing.assert_close(got, want)
    up = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b)


def test_causal_is_refused_not_ignored():
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    with pytest.raises(ValueError, match="halo attention is non-causal"):
        attnlab.attention(q, k, v, "halo", causal=True, shape=(4, 4), block_size=2)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({}, "halo needs shape"),
        ({"shape": (3, 3), "block_size": 2}, "divisible by block_size"),
        ({"shape": (2, 4), "block_size": 2, "halo": -1}, "halo must be a non-negative int"),
        ({"shape": (2, 4), "block_size": 2, "halo": 1.5}, "halo must be a non-negative int"),
        ({"shape": (2, 4), "block_size": 0}, "block_size must be a positive int"),
        ({"shape": (2, 2, 2), "block_size": 1}, "shape must be an int or a tuple of 2"),
        ({"shape": (4, 4), "block_size": 2}, "need T == S == H\\*W=16"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "halo", **opts)

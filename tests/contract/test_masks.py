"""Masks equal the spec exactly, and the invariants between mechanisms hold."""

import itertools

import pytest
import torch

import attnlab


def mask_2d(name, T, S, **options):
    """A mask shared by the batch and the heads: [1, 1, T, S] -> [T, S]."""
    m = attnlab.mask(name, T, S, **options)
    assert m.shape == (1, 1, T, S) and m.dtype == torch.bool
    return m[0, 0]


def natten_window(i, n, k, d, causal):
    """spec/mechanisms.md section 12, written as plain Python for one coordinate."""
    g, ip = i % d, i // d
    n_g = -(-(n - g) // d)
    if causal:
        return g, max(ip - k + 1, 0), ip + 1
    wl, wr = k // 2, k // 2 + k % 2 - 1
    start = max(ip - wl, 0) + (n_g - wr - ip - 1 if ip + wr >= n_g else 0)
    return g, start, start + k


def brute_neighborhood(shape, kernel, dilation, causal):
    coords = list(itertools.product(*[range(n) for n in shape]))
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for a, ca in enumerate(coords):
        for b, cb in enumerate(coords):
            ok = True
            for i, j, n, k, d, c in zip(ca, cb, shape, kernel, dilation, causal):
                g, s, e = natten_window(i, n, k, d, c)
                ok &= j % d == g and s <= j // d < e
            m[a, b] = ok
    return m


NEIGHBORHOOD_CASES = [
    ((9,), (3,), (1,), (False,)),
    ((11,), (4,), (2,), (False,)),
    ((10,), (5,), (1,), (True,)),
    ((6, 7), (3, 3), (2, 1), (False, False)),
    ((5, 8), (3, 4), (1, 2), (True, False)),
    ((3, 4, 5), (3, 2, 3), (1, 2, 1), (False, True, False)),
]


@pytest.mark.parametrize(("shape", "kernel", "dilation", "causal"), NEIGHBORHOOD_CASES)
def test_neighborhood_mask_equals_spec(shape, kernel, dilation, causal):
    T = torch.tensor(shape).prod().item()
    got = mask_2d("neighborhood", T, T, causal=causal, shape=shape, kernel_size=kernel, dilation=dilation)
    assert torch.equal(got, brute_neighborhood(shape, kernel, dilation, causal))
    if not any(causal):  # the window shifts at borders: every query sees exactly prod(kernel) keys
        assert (got.sum(1) == torch.tensor(kernel).prod()).all()


def test_issue_example_mask():
    m = attnlab.mask("neighborhood", 64, 64, shape=(8, 8), kernel_size=(3, 3), dilation=(2, 1))
    assert m.shape == (1, 1, 64, 64) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], brute_neighborhood((8, 8), (3, 3), (2, 1), (False, False)))


def test_neighborhood_covering_the_grid_is_dense():
    assert mask_2d("neighborhood", 20, 20, shape=(4, 5), kernel_size=(4, 5)).all()
    causal = mask_2d("neighborhood", 12, 12, causal=True, shape=(12,), kernel_size=12)
    assert torch.equal(causal, torch.ones(12, 12, dtype=torch.bool).tril())


def test_dilation_is_independent_neighborhoods_on_strided_subgrids():
    n, k, d = 17, 3, 3
    q, kk, v = torch.randn(3, 1, 2, n, 8, dtype=torch.float64)
    out = attnlab.attention(q, kk, v, "neighborhood", shape=(n,), kernel_size=k, dilation=d)
    for g in range(d):
        idx = torch.arange(g, n, d)
        sub = attnlab.attention(
            q[:, :, idx], kk[:, :, idx], v[:, :, idx], "neighborhood", shape=(len(idx),), kernel_size=k
        )
        torch.testing.assert_close(out[:, :, idx], sub)


def test_sliding_window_mask_and_large_window_equals_dense():
    m = mask_2d("sliding_window", 6, 6, causal=True, window=2)
    assert m.sum(1).tolist() == [1, 2, 2, 2, 2, 2] and m.diagonal().all()
    m = mask_2d("sliding_window", 7, 7, window=4)  # |i - j| <= 2, shrinking at the edges
    assert m.sum(1).tolist() == [3, 4, 5, 5, 5, 4, 3]
    q, k, v = torch.randn(3, 1, 2, 30, 8, dtype=torch.float64)
    for causal in (False, True):
        a = attnlab.attention(q, k, v, "sliding_window", causal=causal, window=64)
        torch.testing.assert_close(a, attnlab.attention(q, k, v, causal=causal))


def test_streaming_mask():
    m = mask_2d("streaming", 8, 8, causal=True, sinks=2, window=3)
    for i in range(8):
        assert m[i].nonzero().flatten().tolist() == sorted({j for j in range(i + 1) if j < 2 or j > i - 3})


def test_halo_mask_equals_spec():
    H, W, b, h = 8, 12, 4, 1
    m = mask_2d("halo", H * W, H * W, shape=(H, W), block_size=b, halo=h)
    for a in range(H * W):
        y, x = divmod(a, W)
        y0, x0 = y // b * b, x // b * b
        want = [j for j in range(H * W) if y0 - h <= j // W < y0 + b + h and x0 - h <= j % W < x0 + b + h]
        assert m[a].nonzero().flatten().tolist() == want
    # a halo covering the image with one block is global attention
    assert mask_2d("halo", 16, 16, shape=(4, 4), block_size=4, halo=0).all()


def test_document_and_prefix_masks():
    m = mask_2d("document", 6, 6, causal=True, lengths=(2, 4))
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:2, :2] = torch.ones(2, 2, dtype=torch.bool).tril()
    want[2:, 2:] = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(m, want)
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    m = attnlab.mask("document", 5, 5, document_ids=ids)  # per-batch ids: [B, 1, T, S]
    assert m.shape == (2, 1, 5, 5) and torch.equal(m[1, 0, 3], torch.tensor([False, False, False, True, True]))
    torch.testing.assert_close(mask_2d("document", 5, 5, lengths=(2, 3)), m[0, 0])
    p = mask_2d("prefix_lm", 5, 5, causal=True, prefix=3)
    assert p[0].tolist() == [True, True, True, False, False] and p[3].tolist() == [True] * 4 + [False]


def test_document_with_per_batch_ids_matches_oracle():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 2, 2, 2, 2]])
    q, k, v = torch.randn(3, 2, 2, 9, 4, dtype=torch.float64)
    for causal in (False, True):
        got = attnlab.attention(q, k, v, "document", causal=causal, document_ids=ids)
        want = attnlab.attention(q, k, v, "document", causal=causal, document_ids=ids, impl="reference")
        torch.testing.assert_close(got, want)

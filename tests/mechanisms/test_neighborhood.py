"""Neighborhood attention (NAT / DiNAT, NATTEN semantics): the mask equals spec/mechanisms.md
section 12 written out per coordinate, dilation splits the grid into independent sub-grids, and
bad options name the option."""

import itertools

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


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
    got = _2d(attnlab.mask("neighborhood", T, T, causal=causal, shape=shape, kernel_size=kernel, dilation=dilation))
    assert torch.equal(got, brute_neighborhood(shape, kernel, dilation, causal))
    if not any(causal):  # the window shifts at borders: every query sees exactly prod(kernel) keys
        assert (got.sum(1) == torch.tensor(kernel).prod()).all()


def test_issue_example_mask():
    m = _2d(attnlab.mask("neighborhood", 64, 64, shape=(8, 8), kernel_size=(3, 3), dilation=(2, 1)))
    assert m.shape == (64, 64) and m.dtype == torch.bool
    assert torch.equal(m, brute_neighborhood((8, 8), (3, 3), (2, 1), (False, False)))


def test_neighborhood_covering_the_grid_is_dense():
    assert _2d(attnlab.mask("neighborhood", 20, 20, shape=(4, 5), kernel_size=(4, 5))).all()
    causal = _2d(attnlab.mask("neighborhood", 12, 12, causal=True, shape=(12,), kernel_size=12))
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


@pytest.mark.parametrize("causal", [False, True, (True, False)], ids=["full", "causal", "causal-rows"])
def test_kernel_one_is_each_token_alone(causal):
    m = _2d(attnlab.mask("neighborhood", 12, 12, causal=causal, shape=(3, 4), kernel_size=1))
    assert torch.equal(m, torch.eye(12, dtype=torch.bool))


def test_default_shape_is_the_sequence_as_one_axis():
    # shape=None: one axis of length S, so a kernel of 3 is the 1-D NATTEN window (shifted at the ends)
    m = _2d(attnlab.mask("neighborhood", 7, 7, kernel_size=3))
    assert torch.equal(m, brute_neighborhood((7,), (3,), (1,), (False,)))
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2] and m[6].nonzero().flatten().tolist() == [4, 5, 6]


def test_per_axis_causal_is_causal_along_that_axis_only():
    # rows causal, columns not: token (y, x) sees rows y-1..y and the shifted 3-wide column window
    m = _2d(attnlab.mask("neighborhood", 20, 20, causal=(True, False), shape=(4, 5), kernel_size=(2, 3)))
    for a in range(20):
        y, x = divmod(a, 5)
        x0 = min(max(x - 1, 0), 5 - 3)
        want = [j for j in range(20) if y - 1 <= j // 5 <= y and x0 <= j % 5 < x0 + 3]
        assert m[a].nonzero().flatten().tolist() == want


def test_cross_attention_is_refused_not_ignored():
    q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)
    with pytest.raises(ValueError, match="self-attention over a grid"):
        attnlab.attention(q, k, v, "neighborhood", shape=(4, 4), kernel_size=3)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (
            {"shape": (2, 4), "kernel_size": (3, 3)},
            "kernel_size \\* dilation must be <= the axis length",
        ),
        ({"shape": (2, 4), "kernel_size": (1, 2, 3)}, "kernel_size must be an int or a tuple of 2"),
        ({"shape": (2, 5)}, "need T == S == prod\\(shape\\)"),
        ({"shape": (2, 2, 2, 1), "kernel_size": 1}, "shape must have 1 to 3 axes"),
        ({"shape": (2, 4), "kernel_size": 0}, "kernel_size entries must be ints >= 1"),
        ({"shape": (2, 4), "kernel_size": 1, "dilation": 0}, "dilation entries must be ints >= 1"),
        ({"shape": (2, 4), "kernel_size": 1, "dilation": (1, 2.0)}, "dilation entries must be ints >= 1"),
        ({"shape": (8,), "kernel_size": 3, "dilation": 3}, "kernel_size \\* dilation must be <=.*axis 0: 3 \\* 3 > 8"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "neighborhood", **opts)


def test_causal_needs_one_bool_per_axis():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match="causal must be a bool or a tuple of 2 bools"):
        attnlab.attention(q, k, v, "neighborhood", causal=(True,), shape=(2, 4), kernel_size=1)

"""Prefix-LM attention (T5 / UniLM): bidirectional over the prefix, causal after it, written out by
loops; the edge cases (prefix 0 is causal, prefix S is full attention); bad options naming the option."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def prefix_then_causal(T, S, prefix):
    """The definition: query row i (key position p = i + S - T) sees key j when j < prefix or j <= p."""
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            m[i, j] = j < prefix or j <= i + S - T
    return m


def test_prefix_mask():
    p = _2d(attnlab.mask("prefix_lm", 5, 5, causal=True, prefix=3))
    assert p[0].tolist() == [True, True, True, False, False] and p[3].tolist() == [True] * 4 + [False]


@pytest.mark.parametrize(("T", "S"), [(8, 8), (3, 9), (9, 3)], ids=["self", "cross-short-q", "cross-long-q"])
def test_mask_is_the_prefix_rule_of_the_definition(T, S):
    for prefix in range(S + 1):
        got = _2d(attnlab.mask("prefix_lm", T, S, causal=True, prefix=prefix))
        assert torch.equal(got, prefix_then_causal(T, S, prefix)), prefix


def test_prefix_zero_is_causal_and_prefix_s_is_full_attention():
    for T, S in ((6, 6), (4, 7), (7, 4)):
        assert torch.equal(
            _2d(attnlab.mask("prefix_lm", T, S, causal=True, prefix=0)), _2d(attnlab.mask("dense", T, S, causal=True))
        )
        assert _2d(attnlab.mask("prefix_lm", T, S, causal=True, prefix=S)).all()  # even rows before the first key
    q, k, v = torch.randn(3, 1, 2, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(
        attnlab.attention(q, k, v, "prefix_lm", causal=True, prefix=7), attnlab.attention(q, k, v)
    )
    torch.testing.assert_close(
        attnlab.attention(q, k, v, "prefix_lm", causal=True, prefix=0), attnlab.attention(q, k, v, causal=True)
    )


def test_executor_matches_the_oracle_forward_and_gradients():
    q = torch.randn(1, 4, 29, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 41, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for prefix in (0, 13, 41):
        with attnlab.kernels.block_size(8, 8):  # the prefix ends inside a key block
            got = attnlab.attention(q, k, v, "prefix_lm", causal=True, prefix=prefix)
        want = attnlab.attention(q, k, v, "prefix_lm", causal=True, prefix=prefix, impl="reference")
        torch.testing.assert_close(got, want)
        up = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
            torch.testing.assert_close(a, b)


def test_non_causal_is_refused_not_ignored():
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    with pytest.raises(ValueError, match="prefix_lm is causal after its prefix by definition"):
        attnlab.attention(q, k, v, "prefix_lm", prefix=2)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"prefix": 9}, "prefix must be <= the key length"),
        ({"prefix": -1}, "prefix must be a non-negative int"),
        ({"prefix": 1.5}, "prefix must be a non-negative int"),
        ({"prefix": None}, "prefix must be a non-negative int"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "prefix_lm", causal=True, **opts)

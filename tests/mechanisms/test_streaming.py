"""Streaming attention with sinks (StreamingLLM): sinks plus a window written out by loops, the
edge cases (no sinks, sinks covering the keys, causal sinks stay causal), and bad options."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def sinks_and_window(T, S, causal, sinks, window):
    """The definition, one (query, key) pair at a time: query row i sits at key position i + S - T."""
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = i + S - T
        for j in range(S):
            if causal:
                m[i, j] = j <= p and (j < sinks or j > p - window)
            else:
                m[i, j] = j < sinks or abs(p - j) <= window // 2
    return m


def test_streaming_mask():
    m = _2d(attnlab.mask("streaming", 8, 8, causal=True, sinks=2, window=3))
    for i in range(8):
        assert m[i].nonzero().flatten().tolist() == sorted({j for j in range(i + 1) if j < 2 or j > i - 3})


@pytest.mark.parametrize(("T", "S"), [(10, 10), (4, 12), (12, 4)], ids=["self", "cross-short-q", "cross-long-q"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_is_sinks_plus_window_of_the_definition(T, S, causal):
    for sinks, window in ((0, 1), (1, 1), (2, 3), (3, 4), (5, 2), (20, 1), (2, 40)):
        got = _2d(attnlab.mask("streaming", T, S, causal=causal, sinks=sinks, window=window))
        assert torch.equal(got, sinks_and_window(T, S, causal, sinks, window)), (sinks, window)


def test_no_sinks_is_the_sliding_window():
    for causal in (False, True):
        for window in (1, 4, 9):
            got = _2d(attnlab.mask("streaming", 9, 9, causal=causal, sinks=0, window=window))
            want = _2d(attnlab.mask("sliding_window", 9, 9, causal=causal, window=window))
            assert torch.equal(got, want)


def test_sinks_covering_the_keys_are_dense_and_causal_sinks_stay_causal():
    assert _2d(attnlab.mask("streaming", 6, 6, sinks=6, window=1)).all()
    causal = _2d(attnlab.mask("streaming", 6, 6, causal=True, sinks=6, window=1))
    assert torch.equal(causal, torch.ones(6, 6, dtype=torch.bool).tril())  # never a sink after the query
    q, k, v = torch.randn(3, 1, 2, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(
        attnlab.attention(q, k, v, "streaming", causal=True, sinks=6, window=1),
        attnlab.attention(q, k, v, causal=True),
    )


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"sinks": -1}, "sinks must be a non-negative int"),
        ({"sinks": 1.5}, "sinks must be a non-negative int"),
        ({"sinks": None}, "sinks must be a non-negative int"),
        ({"window": 0}, "window must be a positive int"),
        ({"window": 2.0}, "window must be a positive int"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "streaming", **opts)

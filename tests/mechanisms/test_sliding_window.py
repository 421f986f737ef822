"""Sliding-window attention (Longformer / Mistral): the band written out by loops, its edges
(window 1, window >= S, cross-attention offsets), and bad options naming the option."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def band(T, S, causal, window):
    """The definition, one (query, key) pair at a time: query row i sits at key position i + S - T."""
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = i + S - T
        for j in range(S):
            m[i, j] = (p - window < j <= p) if causal else abs(p - j) <= window // 2
    return m


def test_sliding_window_mask_and_large_window_equals_dense():
    m = _2d(attnlab.mask("sliding_window", 6, 6, causal=True, window=2))
    assert m.sum(1).tolist() == [1, 2, 2, 2, 2, 2] and m.diagonal().all()
    m = _2d(attnlab.mask("sliding_window", 7, 7, window=4))  # |i - j| <= 2, shrinking at the edges
    assert m.sum(1).tolist() == [3, 4, 5, 5, 5, 4, 3]
    q, k, v = torch.randn(3, 1, 2, 30, 8, dtype=torch.float64)
    for causal in (False, True):
        a = attnlab.attention(q, k, v, "sliding_window", causal=causal, window=64)
        torch.testing.assert_close(a, attnlab.attention(q, k, v, causal=causal))


@pytest.mark.parametrize(("T", "S"), [(9, 9), (4, 11), (11, 4)], ids=["self", "cross-short-q", "cross-long-q"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_is_the_band_of_the_definition(T, S, causal):
    for window in (1, 2, 3, 4, 7, 30):
        got = _2d(attnlab.mask("sliding_window", T, S, causal=causal, window=window))
        assert torch.equal(got, band(T, S, causal, window)), window


def test_window_one_is_the_query_position_alone():
    # causal: (p - 1, p]; non-causal: |p - j| <= 0. Either way the bottom-right diagonal.
    for causal in (False, True):
        m = _2d(attnlab.mask("sliding_window", 3, 5, causal=causal, window=1))
        assert torch.equal(m, torch.eye(5, dtype=torch.bool)[2:])
    # T > S: rows before the first key position see nothing
    m = _2d(attnlab.mask("sliding_window", 5, 3, causal=True, window=1))
    assert m.sum(1).tolist() == [0, 0, 1, 1, 1]


def test_window_covering_the_keys_is_dense_or_causal():
    for window in (6, 7, 100):  # causal needs window >= S; non-causal window // 2 >= S - 1
        assert torch.equal(
            _2d(attnlab.mask("sliding_window", 4, 6, causal=True, window=window)),
            _2d(attnlab.mask("dense", 4, 6, causal=True)),
        )
    assert _2d(attnlab.mask("sliding_window", 4, 6, window=10)).all()
    assert not _2d(attnlab.mask("sliding_window", 4, 6, window=9)).all()  # 9 // 2 = 4 < 5: the far corner is out


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "4", None], ids=repr)
def test_bad_options(window):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match="window must be a positive int"):
        attnlab.attention(q, k, v, "sliding_window", window=window)

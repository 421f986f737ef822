"""Span search (Superlinear, N=2): the anchor rule by loops, the spec's equivalences, bad input."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.span_search import _search


def test_anchor_selection_by_loops():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 50, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 50, 4, dtype=torch.float64)
    opts = {"num_spans": 2, "sw_index": 1, "backward_factor": 2.0, "forward_factor": 0.0, "span_power": 0.5}
    anchor, score, ok = _search(q, k, torch.arange(50), opts)
    for h in range(2):
        for t in range(50):
            cands = []
            i = 2  # w + 1
            while t - i * i + 1 >= 0:
                a = t - i * i + 1
                cands.append((float(q[0, h, t] @ k[0, 0, a]), -i, a))
                i += 1
            best = sorted(cands, reverse=True)[:2]  # score desc, then the more recent anchor
            got = [int(a) for a, good in zip(anchor[0, h, t], ok[0, h, t]) if good]
            assert got == [a for _, _, a in best], (h, t)


def test_window_alone_is_sliding_window_and_huge_spans_are_dense():
    q, k, v = torch.randn(3, 1, 2, 40, 8, dtype=torch.float64)
    W = (6 + 1) ** 2 - 1  # 48 >= T: no anchor is ever valid
    out = attnlab.attention(q, k, v, "span_search", causal=True, sw_index=6)
    torch.testing.assert_close(out, attnlab.attention(q, k, v, "sliding_window", causal=True, window=W))
    dense = attnlab.attention(
        q, k, v, "span_search", causal=True, num_spans=1, sw_index=1, backward_factor=1e6, forward_factor=1e6
    )
    torch.testing.assert_close(dense, attnlab.attention(q, k, v, causal=True))


def test_cost_grows_like_sqrt_length_per_query():
    # the keys a query can touch: k spans of ~ (b + f) sqrt(t) plus the window
    from attnlab.mechanisms.span_search import _bounds

    opts = {"num_spans": 3, "sw_index": 3, "backward_factor": 2.0, "forward_factor": 0.0, "span_power": 0.5}
    for T in (1024, 16384):
        t = torch.tensor([T - 1])
        lo, hi, _ = _bounds(t, torch.full((1, 1, 1, 3), T // 2), opts)
        assert int((hi - lo + 1).max()) <= 2 * math.sqrt(T) + 2


@pytest.mark.parametrize(
    ("opts", "causal", "match"),
    [
        ({}, False, "causal by construction"),
        ({"num_spans": 0}, True, "num_spans must be a positive int"),
        ({"backward_factor": -1}, True, "backward_factor must be a finite number >= 0"),
    ],
)
def test_bad_options(opts, causal, match):
    q, k, v = torch.randn(3, 1, 1, 16, 4)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "span_search", causal=causal, **opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("H", "Hkv", "T", "S", "opts"),
    [
        (4, 2, 70, 70, {}),  # GQA, causal self
        (2, 2, 45, 90, {"num_spans": 2, "sw_index": 1, "backward_factor": 1.0, "forward_factor": 0.5}),
        (4, 1, 90, 45, {"sw_index": 0, "forward_factor": 1.0}),  # rows before the first key; no window
        (2, 1, 33, 33, {"num_spans": 5, "sw_index": 2, "span_power": 0.6}),
    ],
)
def test_chunked_path_matches_the_oracle_with_gradients(monkeypatch, dtype, H, Hkv, T, S, opts):
    """Several chunks of 16 queries (the last one padded): forward and dq, dk, dv against the oracle."""
    from attnlab.mechanisms import span_search
    from attnlab.testing import compare_to_reference

    monkeypatch.setattr(span_search, "_CHUNK", 16)
    torch.manual_seed(T + S + H)
    q = torch.randn(2, H, T, 8, dtype=dtype)
    k, v = torch.randn(2, 2, Hkv, S, 8, dtype=dtype)
    assert not compare_to_reference("span_search", q, k, v, causal=True, **opts)


def test_span_runs_cover_every_span(monkeypatch):
    """The static per-chunk bound L holds every span: widening it changes nothing."""
    from attnlab.mechanisms import span_search

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 300, 8, dtype=torch.float64)
    opts = {"num_spans": 3, "sw_index": 1, "backward_factor": 3.0, "forward_factor": 1.0, "span_power": 0.5}
    got = attnlab.attention(q, k, v, "span_search", causal=True, **opts)
    exact = span_search._span_lengths
    wider = lambda t, o: tuple(x + 7 for x in exact(t, o)) if isinstance(t, int) else exact(t, o)
    monkeypatch.setattr(span_search, "_span_lengths", wider)
    torch.testing.assert_close(attnlab.attention(q, k, v, "span_search", causal=True, **opts), got)

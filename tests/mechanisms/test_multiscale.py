"""Multi-scale attention: every key represented exactly once, the loop-level rule, equivalences."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.multiscale import mask, pool_levels


def member_counts(S, pools):
    counts = [torch.ones(S)]
    for f in pools:
        n = math.ceil(S / f)
        counts.append(torch.clamp(S - torch.arange(n) * f, max=f).float())
    return torch.cat(counts)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("T", "S", "window", "pools"), [(50, 50, 4, (2, 8)), (20, 61, 3, (3, 6, 12)), (40, 33, 5, (4,))]
)
def test_every_visible_key_is_represented_exactly_once(causal, T, S, window, pools):
    m = mask(T, S, causal=causal, window=window, pools=pools)
    represented = (m.float() * member_counts(S, pools)).sum(1)
    p = torch.arange(T) + S - T
    visible = torch.where(p >= 0, (p + 1) if causal else torch.full_like(p, S), 0).float()
    assert torch.equal(represented, visible)


def test_rule_by_loops():
    T = S = 40
    window, pools, causal = 4, (2, 8), True
    m = mask(T, S, causal=causal, window=window, pools=pools)
    reach = [window] + [window * f for f in pools]
    for p in range(T):
        for lv, f in enumerate(pools, start=1):
            for b in range(math.ceil(S / f)):
                members = range(b * f, min((b + 1) * f, S))
                far = all(p - j >= reach[lv - 1] for j in members)
                parent_far = lv < len(pools) and all(
                    p - j >= reach[lv]
                    for j in range(b * f // pools[lv] * pools[lv], min((b * f // pools[lv] + 1) * pools[lv], S))
                )
                col = S + sum(math.ceil(S / g) for g in pools[: lv - 1]) + b
                assert bool(m[p, col]) == (far and not parent_far), (p, lv, b)


def test_wide_window_is_dense_and_pooled_keys_are_block_means():
    q, k, v = torch.randn(3, 1, 2, 30, 8, dtype=torch.float64)
    for causal in (False, True):
        out = attnlab.attention(q, k, v, "multiscale", causal=causal, window=64, pools=(2, 4))
        torch.testing.assert_close(out, attnlab.attention(q, k, v, causal=causal))
    pooled = pool_levels(k, (4,))
    torch.testing.assert_close(pooled[:, :, 30:37], k[:, :, :28].unflatten(2, (7, 4)).mean(3))
    torch.testing.assert_close(pooled[:, :, 37], k[:, :, 28:].mean(2))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"window": 0}, "window must be a positive int"),
        ({"pools": (4, 6)}, "each divide the next"),
        ({"pools": ()}, "non-empty tuple"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = torch.randn(3, 1, 1, 16, 4)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "multiscale", **opts)

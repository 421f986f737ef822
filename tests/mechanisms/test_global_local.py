"""Global-local mixture: each branch alone, pooling, gates, grids."""

import pytest
import torch
import torch.nn.functional as F

import attnlab


def qkv(T=40, S=40, H=4, Hkv=2):
    return (
        torch.randn(1, H, T, 8, dtype=torch.float64),
        torch.randn(1, Hkv, S, 8, dtype=torch.float64),
        torch.randn(1, Hkv, S, 8, dtype=torch.float64),
    )


def test_gate_one_is_the_local_branch_and_gate_zero_the_pooled_global_branch():
    q, k, v = qkv()
    for causal in (False, True):
        local = attnlab.attention(q, k, v, "global_local", causal=causal, window=6, gate=1.0)
        torch.testing.assert_close(local, attnlab.attention(q, k, v, "sliding_window", causal=causal, window=6))
    glob = attnlab.attention(q, k, v, "global_local", window=6, pool=4, gate=0.0)
    kp, vp = (x.view(1, 2, 10, 4, 8).mean(3) for x in (k, v))
    torch.testing.assert_close(glob, F.scaled_dot_product_attention(q, kp, vp, enable_gqa=True))


def test_pool_one_global_branch_is_dense_and_gates_mix_linearly():
    q, k, v = qkv(T=13, S=29)
    for causal in (False, True):
        g = attnlab.attention(q, k, v, "global_local", causal=causal, pool=1, gate=0.0)
        torch.testing.assert_close(g, attnlab.attention(q, k, v, causal=causal))
    gate = torch.rand(1, 4, 13, 1, dtype=torch.float64)
    a = attnlab.attention(q, k, v, "global_local", causal=True, window=5, pool=3, gate=gate)
    lo = attnlab.attention(q, k, v, "global_local", causal=True, window=5, pool=3, gate=1.0)
    gl = attnlab.attention(q, k, v, "global_local", causal=True, window=5, pool=3, gate=0.0)
    torch.testing.assert_close(a, gate * lo + (1 - gate) * gl)


def test_grid_branches_and_oracle():
    q, k, v = qkv(T=48, S=48)
    opts = {"shape": (6, 8), "kernel_size": 3, "pool": (2, 4), "gate": 0.25}
    got = attnlab.attention(q, k, v, "global_local", **opts)
    ref = attnlab.attention(q, k, v, "global_local", impl="reference", **opts)
    torch.testing.assert_close(got, ref)
    local = attnlab.attention(q, k, v, "global_local", **{**opts, "gate": 1.0})
    torch.testing.assert_close(local, attnlab.attention(q, k, v, "neighborhood", shape=(6, 8), kernel_size=3))


@pytest.mark.parametrize(
    ("T", "S", "causal", "opts"),
    [
        (40, 40, True, {"window": 6, "pool": 4}),
        (13, 29, True, {"window": 5, "pool": 3}),  # cross: a trailing partial pooled block
        (29, 13, False, {"window": 5, "pool": 3}),
        (48, 48, False, {"shape": (6, 8), "kernel_size": 3, "pool": (2, 4)}),
    ],
)
def test_branches_have_the_oracles_lses_and_mix_into_the_output(T, S, causal, opts):
    """global_local has no LSE (attention_lse refuses it), but each branch is one softmax:
    ``branches`` returns both with their LSEs, equal to the dense oracle's per branch."""
    from attnlab import reference
    from attnlab.mechanisms import global_local

    q, k, v = qkv(T=T, S=S)
    local, glob = global_local.branches(q, k, v, causal=causal, **opts, gate=0.3)
    if "shape" in opts:
        local_mask = attnlab.mask("neighborhood", T, S, shape=opts["shape"], kernel_size=opts["kernel_size"])
    else:
        local_mask = attnlab.mask("sliding_window", T, S, causal=causal, window=opts["window"])
    want_local = reference.attention(q, k, v, local_mask)
    kp, vp = (global_local.pool_kv(x, opts.get("shape"), opts["pool"]) for x in (k, v))
    if causal:  # a pooled block is seen once its last member is in the past
        pos = torch.arange(T).view(T, 1) + S - T
        glob_mask = (torch.arange(kp.shape[2]).view(1, -1) + 1) * opts["pool"] - 1 <= pos
        want_glob = reference.attention(q, kp, vp, glob_mask)
    else:
        want_glob = reference.attention(q, kp, vp)
    for got, want in ((local, want_local), (glob, want_glob)):
        torch.testing.assert_close(got.out, want.out, atol=1e-12, rtol=1e-12)
        empty = torch.isneginf(want.lse)
        assert torch.equal(torch.isneginf(got.lse), empty)
        torch.testing.assert_close(got.lse[~empty], want.lse[~empty], atol=1e-12, rtol=1e-12)
    mixed = attnlab.attention(q, k, v, "global_local", causal=causal, **opts, gate=0.3)
    torch.testing.assert_close(mixed, 0.3 * local.out + 0.7 * glob.out, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="pool must be a positive int"):
        global_local.branches(q, k, v, causal=causal, pool=0)


@pytest.mark.parametrize(
    ("opts", "causal", "match"),
    [
        ({"gate": 1.5}, False, "gate must be a float in \\[0, 1\\]"),
        ({"pool": 0}, False, "pool must be a positive int"),
        ({"shape": (5, 8), "kernel_size": 3}, True, "bidirectional"),
        ({"shape": (5, 8), "kernel_size": 3, "pool": (1, 2, 3)}, False, "pool must be an int or a tuple of 2"),
    ],
)
def test_bad_options(opts, causal, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "global_local", causal=causal, **opts)

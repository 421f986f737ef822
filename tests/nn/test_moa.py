"""MixtureOfAttention (BAM soft MoA): against experts written out by hand, the router, KV sharing,
per-expert mechanisms, and bad options."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.nn import MixtureOfAttention

DIM, H = 16, 4


def inputs(B=2, L=9, seed=0):
    return torch.randn(B, L, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def moa(experts, seed=0, **kw):
    torch.manual_seed(seed)
    return MixtureOfAttention(DIM, H, experts, **kw).double()


def expert_by_hand(m, x, e, causal):
    """Expert e from the module's weights, with plain SDPA (GQA by repeat_interleave)."""
    B, L, _ = x.shape
    d, Hkv = m.head_dim, m.kv_heads
    j = 0 if m.share_kv else e
    wq = m.q.weight.view(m.experts, H * d, DIM)[e]
    wk = m.k.weight.view(-1, Hkv * d, DIM)[j]
    wv = m.v.weight.view(-1, Hkv * d, DIM)[j]
    wo = m.o.weight.view(DIM, m.experts, H * d)[:, e]
    q = (x @ wq.T).view(B, L, H, d).transpose(1, 2)
    k, v = ((x @ w.T).view(B, L, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, 1) for w in (wk, wv))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return o.transpose(1, 2).flatten(-2) @ wo.T


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_one_expert_is_plain_attention(kv_heads, causal):
    m = moa(1, kv_heads=kv_heads, causal=causal)
    x = inputs()
    torch.testing.assert_close(m(x), expert_by_hand(m, x, 0, causal))


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_uniform_router_is_the_average_of_the_experts(share_kv, kv_heads):
    m = moa(3, kv_heads=kv_heads, share_kv=share_kv, causal=True)
    with torch.no_grad():
        m.router.weight.zero_()
    x = inputs()
    want = sum(expert_by_hand(m, x, e, True) for e in range(3)) / 3
    torch.testing.assert_close(m(x), want)


def test_forward_is_the_gate_weighted_sum_of_expert_outputs():
    m = moa(3, kv_heads=2, causal=True)
    x = inputs()
    g = m.gates(x)
    torch.testing.assert_close(g.sum(-1), torch.ones_like(g[..., 0]))
    experts = m.expert_outputs(x)
    for e in range(3):
        torch.testing.assert_close(experts[:, :, e], expert_by_hand(m, x, e, True))
    torch.testing.assert_close(m(x), torch.einsum("ble,bled->bld", g, experts))


def test_share_kv_ties_key_and_value_parameters():
    E, Hkv, d = 3, 2, DIM // H
    shared, separate = moa(E, kv_heads=Hkv, share_kv=True), moa(E, kv_heads=Hkv)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    common = DIM * E + 2 * E * H * d * DIM  # router, per-expert queries and outputs
    assert count(shared) == common + 2 * Hkv * d * DIM
    assert count(separate) == common + 2 * E * Hkv * d * DIM
    # sharing = separate experts whose key/value weights are copies of one set
    separate.load_state_dict({k: v for k, v in shared.state_dict().items() if k[0] not in "kv"}, strict=False)
    with torch.no_grad():
        separate.k.weight.copy_(shared.k.weight.repeat(E, 1))
        separate.v.weight.copy_(shared.v.weight.repeat(E, 1))
    x = inputs()
    torch.testing.assert_close(separate(x), shared(x))


@pytest.mark.parametrize("share_kv", [False, True])
def test_gradients_reach_the_router_and_every_projection(share_kv):
    m = moa(3, kv_heads=2, share_kv=share_kv, causal=True)
    m(inputs()).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_experts_can_run_different_mechanisms():
    spec = ["dense", ("sliding_window", {"window": 3}), ("fixed_pattern", {"kind": "relu"})]
    m = moa(3, kv_heads=2, mechanism=spec, causal=True, share_kv=True)
    x = inputs(L=12)
    experts = m.expert_outputs(x)
    torch.testing.assert_close(experts[:, :, 0], expert_by_hand(m, x, 0, True))
    one = moa(3, kv_heads=2, mechanism="sliding_window", window=3, causal=True, share_kv=True)
    one.load_state_dict(m.state_dict())
    torch.testing.assert_close(one.expert_outputs(x)[:, :, 1], experts[:, :, 1])  # one stacked call
    torch.testing.assert_close(m(x), torch.einsum("ble,bled->bld", m.gates(x), experts))


def test_per_kv_head_patterns_run_expert_by_expert():
    """strided_shard's pattern depends on the kv head index: stacking experts would shift it."""
    opts = {"block_size": 2, "local_blocks": 1, "vert_stride": 2}
    for share_kv in (False, True):
        m = moa(2, kv_heads=2, mechanism="strided_shard", causal=True, share_kv=share_kv, **opts)
        listed = moa(2, kv_heads=2, mechanism=[("strided_shard", opts)] * 2, causal=True, share_kv=share_kv)
        listed.load_state_dict(m.state_dict())
        x = inputs(L=12)
        torch.testing.assert_close(m(x), listed(x))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((DIM, H, 0), {}, "experts must be a positive int"),
        ((DIM, H, 2), {"kv_heads": 3}, "heads must be a multiple of kv_heads"),
        ((18, H, 2), {}, "dim must be a multiple of heads"),
        ((DIM, H, 2), {"mechanism": ["dense"]}, "a sequence of 2 entries"),
        ((DIM, H, 2), {"mechanism": ["dense", "nope"]}, "unknown mechanism 'nope'"),
        ((DIM, H, 2), {"mechanism": ["dense", ("dense", 3)]}, "a name or a \\(name, options dict\\) pair"),
        ((DIM, H, 2), {"mechanism": ["dense", "dense"], "window": 3}, "give options as \\(name, options\\) pairs"),
        ((DIM, H, 2), {"share_kv": "yes"}, "share_kv must be a bool"),
        ((DIM, H, 2), {"head_dim": 0}, "head_dim must be a positive int"),
    ],
)
def test_bad_options(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfAttention(*args, **kwargs)


def test_bad_input_and_bad_mechanism_option():
    with pytest.raises(ValueError, match="x must be \\[B, L, 16\\]"):
        moa(2)(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="sliding_window got unknown option"):
        moa(2, mechanism="sliding_window", wndow=3)(inputs())


@settings(max_examples=15, deadline=None)
@given(
    E=st.integers(1, 4),
    kv=st.sampled_from([1, 2, 4]),
    share_kv=st.booleans(),
    causal=st.booleans(),
    L=st.integers(1, 11),
    seed=st.integers(0, 999),
)
def test_fuzz_stacked_call_equals_experts_by_hand(E, kv, share_kv, causal, L, seed):
    m = moa(E, seed=seed, kv_heads=kv, share_kv=share_kv, causal=causal)
    x = inputs(B=1, L=L, seed=seed)
    g = m.gates(x)
    want = sum(g[..., e : e + 1] * expert_by_hand(m, x, e, causal) for e in range(E))
    torch.testing.assert_close(m(x), want)

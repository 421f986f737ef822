"""Mixture-of-Head attention: the gated-heads core against its oracle, and nn.MoHAttention's routing,
gates, load-balance loss and equivalences (spec §1.8)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.core import merge_lse
from attnlab.kernels import block_size
from attnlab.nn import Attention, MoHAttention
from attnlab.nn.moh import load_balance_loss, top_k_mask
from attnlab.testing import cases, compare_to_reference

# -- the functional core: attnlab.attention(..., "moh", gates=...) ----------------------------------


def random_gates(B, H, T, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(B, H, T, 1, generator=g, dtype=torch.float64) * 2
    return torch.where(torch.rand(B, H, T, 1, generator=g, dtype=torch.float64) < 0.3, 0.0, gates).to(dtype)


CORE_CASES = list(cases(attnlab.get("moh")))


@pytest.mark.parametrize("case", CORE_CASES, ids=[str(c) for c in CORE_CASES])
def test_core_with_per_token_per_head_gates_matches_oracle(case):
    """The contract grid (fp32/bf16/fp64 x causal x self/cross x MHA/GQA x odd lengths) with real
    per-(token, head) gates, which the registry's length-free example cannot build."""
    q, k, v = case.inputs(seed=7)
    gates = random_gates(q.shape[0], q.shape[1], q.shape[2], seed=case.T * case.H, dtype=q.dtype)
    with block_size(8, 16):  # small tiles: causal cross runs on the executor across many blocks
        assert not compare_to_reference("moh", q, k, v, causal=case.causal, gates=gates)


def test_core_without_gates_is_dense_and_zero_gates_give_exact_zeros():
    q, k, v = torch.randn(3, 2, 4, 19, 8)
    for causal in (False, True):
        assert torch.equal(attnlab.attention(q, k, v, "moh", causal=causal), attnlab.attention(q, k, v, causal=causal))
    gates = torch.tensor([1.0, 0.0, 2.0, 0.0]).view(1, 4, 1, 1)
    out = attnlab.attention(q, k, v, "moh", gates=gates)
    dense = attnlab.attention(q, k, v)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])) and torch.equal(out[:, 3], out[:, 3] * 0)
    torch.testing.assert_close(out[:, 2], 2 * dense[:, 2])


@pytest.mark.parametrize("impl", ["reference", "sdpa", "blocksparse"])
def test_lse_merges_gated_partials_over_key_shards(impl):
    """moh's LSE is the softmax's: gated results over two disjoint key shards, merged by their LSEs
    (what context parallelism does), equal the gated result over all keys (moh.py's docstring)."""
    q = torch.randn(2, 4, 11, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 20, 8, dtype=torch.float64)
    gates = random_gates(2, 4, 11, seed=5)  # a third of the rows exactly 0
    full = attnlab.attention_lse(q, k, v, "moh", impl=impl, gates=gates)
    shards = (slice(0, 9), slice(9, None))
    parts = [attnlab.attention_lse(q, k[:, :, s], v[:, :, s], "moh", impl=impl, gates=gates) for s in shards]
    merged = merge_lse(parts[0].out, parts[0].lse, parts[1].out, parts[1].lse)
    torch.testing.assert_close(merged.out, full.out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(merged.lse, full.lse, atol=1e-12, rtol=1e-12)
    off = (gates == 0).squeeze(-1)  # [B, H, T]: routed-off rows
    assert off.any() and torch.equal(full.out[off], torch.zeros_like(full.out[off]))
    assert torch.isfinite(full.lse[off]).all()
    dense = attnlab.attention_lse(q, k, v, impl="reference")
    torch.testing.assert_close(full.lse, dense.lse, atol=1e-12, rtol=1e-12)  # the gates leave the LSE alone


def test_core_oracle_gradcheck():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gates = torch.rand(1, 2, 3, 1, dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        fn = lambda q, k, v, g: attnlab.attention(q, k, v, "moh", causal=causal, impl="reference", gates=g)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (q, k, v, gates))


@pytest.mark.parametrize(
    ("gates", "match"),
    [
        ([1.0], "gates must be None or a floating tensor"),
        (torch.ones(4, dtype=torch.long), "gates must be None or a floating tensor"),
        (torch.ones(7), "last axis 1"),  # a per-token vector without its trailing 1
        (torch.ones(6, 1), "T=7"),
        (torch.ones(1, 1, 1, 1, 1), "last axis 1"),
        (torch.ones(3, 1, 7, 1), "got shape \\(3, 1, 7, 1\\)"),  # batch 3 vs 2
    ],
)
def test_core_bad_gates(gates, match):
    q, k, v = torch.randn(3, 2, 4, 7, 8)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "moh", gates=gates)


# -- the layer ------------------------------------------------------------------------------------


def zero_routers(layer: MoHAttention):
    with torch.no_grad():
        for lin in (layer.router, layer.shared_router, layer.balance):
            if lin is not None:
                lin.weight.zero_()
    return layer


def plain_copy(layer: MoHAttention, **kwargs) -> Attention:
    a = layer.attention
    plain = Attention(a.dim, a.heads, a.kv_heads, a.mechanism, causal=a.causal, **kwargs, **a.options)
    plain.load_state_dict(a.state_dict())
    return plain.to(a.q_proj.weight.dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_all_heads_shared_with_uniform_router_is_plain_multi_head_attention(causal):
    torch.manual_seed(0)
    layer = zero_routers(MoHAttention(32, 4, 2, shared_heads=4, causal=causal, rope=True).double())
    assert layer.router is None and layer.balance is None and layer.top_k == 0
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, aux = layer(x)
    torch.testing.assert_close(out, plain_copy(layer, rope=True)(x), atol=1e-12, rtol=1e-12)
    assert aux.item() == 0


@pytest.mark.parametrize(("shared", "heads"), [(0, 4), (1, 4), (2, 6), (3, 4)])
def test_uniform_router_with_every_routed_head_active_is_plain_multi_head_attention(shared, heads):
    """Spec §1.8: W_r = W_s = W_h = 0 and top_k = h_r make every gate 1."""
    torch.manual_seed(1)
    layer = zero_routers(MoHAttention(8 * heads, heads, shared_heads=shared, top_k=heads - shared).double())
    x = torch.randn(2, 7, 8 * heads, dtype=torch.float64)
    torch.testing.assert_close(layer.route(x).gates, torch.ones(2, 7, heads, dtype=torch.float64))
    torch.testing.assert_close(layer(x).output, plain_copy(layer)(x), atol=1e-12, rtol=1e-12)


def test_top_k_ties_prefer_the_higher_head_index():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]])
    want = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(top_k_mask(p, 2), want)
    layer = zero_routers(MoHAttention(24, 6, shared_heads=2, top_k=2))  # uniform: routed heads 4, 5 win
    assert torch.equal(layer.route(torch.randn(1, 3, 24)).selected, torch.tensor([[[0, 0, 1, 1]] * 3]).bool())


def test_unselected_routed_heads_contribute_exactly_zero():
    torch.manual_seed(2)
    layer = MoHAttention(32, 8, shared_heads=2, top_k=3)
    x = torch.randn(2, 10, 32)
    out, _ = layer(x)
    off = (layer.route(x).gates == 0).transpose(1, 2).unsqueeze(-1)  # [B, H, T, 1]
    assert off.sum() == 2 * 10 * 3  # exactly h_r - top_k routed heads off per token
    real = layer.attention.attend
    layer.attention.attend = lambda q, k, v: torch.where(off, float("nan"), real(q, k, v))
    assert torch.equal(layer(x).output, out)  # even NaN rows of inactive heads leave no trace


@pytest.mark.parametrize("norm", ["code", "paper"])
def test_gates_follow_the_formula(norm):
    torch.manual_seed(3)
    hs, hr, K = 3, 5, 2
    layer = MoHAttention(16, hs + hr, shared_heads=hs, top_k=K, gate_normalization=norm).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    r = layer.route(x)
    p = torch.softmax(x @ layer.router.weight.T, -1)
    ps = torch.softmax(x @ layer.shared_router.weight.T, -1)
    alpha = torch.softmax(x @ layer.balance.weight.T, -1)
    sel = p >= p.topk(K, -1).values[..., -1:]
    if norm == "code":
        g_r = K * torch.where(sel, p, 0) / (p * sel).sum(-1, keepdim=True)
        want = torch.cat((2 * alpha[..., :1] * hs * ps, 2 * alpha[..., 1:] * g_r), -1)
        g = r.gates  # spec §1.8 row sums: Σ routed = K α2, Σ shared = h_s α1, α1 + α2 = 2
        torch.testing.assert_close(g[..., :hs].sum(-1) / hs + g[..., hs:].sum(-1) / K, torch.full((2, 6), 2.0).double())
    else:
        want = torch.cat((alpha[..., :1] * ps, alpha[..., 1:] * torch.where(sel, p, 0)), -1)
    assert torch.equal(r.selected, sel)
    torch.testing.assert_close(r.gates, want, atol=1e-12, rtol=1e-12)


def test_load_balance_loss_by_hand():
    # 3 tokens, 3 routed heads, top-1, made-up router probabilities
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.6, 0.1, 0.3]], dtype=torch.float64)
    sel = top_k_mask(probs, 1)  # heads 0, 1, 0
    P = [(0.5 + 0.1 + 0.6) / 3, (0.3 + 0.7 + 0.1) / 3, (0.2 + 0.2 + 0.3) / 3]
    f = [2 / 3, 1 / 3, 0.0]
    want = 3 * sum(a * b for a, b in zip(P, f))
    assert load_balance_loss(probs, sel).item() == pytest.approx(want, rel=1e-12)
    # the layer's aux output is that loss over all B*T tokens of its own routing
    layer = MoHAttention(24, 6, shared_heads=2, top_k=2).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    r = layer.route(x)
    Pl, fl = r.probs.mean((0, 1)), r.selected.double().mean((0, 1))
    torch.testing.assert_close(layer(x).aux_loss, 4 * (Pl * fl).sum())
    # perfectly uniform routing gives top_k (spec §1.8), not 1
    assert load_balance_loss(torch.full((4, 4), 0.25), torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 2).bool()) == 2


def test_gradients_reach_every_router_and_projection():
    torch.manual_seed(4)
    layer = MoHAttention(32, 8, 4, "sliding_window", shared_heads=3, top_k=2, causal=True, rope=True, window=4)
    out, aux = layer(torch.randn(2, 11, 32))
    (out.square().mean() + 0.01 * aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    only_aux = MoHAttention(16, 4, shared_heads=1, top_k=1)
    only_aux(torch.randn(1, 6, 16)).aux_loss.backward()
    assert only_aux.router.weight.grad.abs().sum() > 0  # the balance loss alone trains the router


def test_causal_layer_never_sees_the_future():
    torch.manual_seed(5)
    layer = MoHAttention(16, 4, shared_heads=1, top_k=2, causal=True).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y = layer(x).output
    x2 = x.clone()
    x2[:, 5:] += torch.randn(1, 3, 16, dtype=torch.float64)
    assert torch.equal(layer(x2).output[:, :5], y[:, :5])


def test_dense_layer_core_is_the_registered_moh_mechanism():
    torch.manual_seed(6)
    layer = MoHAttention(24, 6, 2, shared_heads=2, top_k=2).double()
    x, mem = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    q, k, v = layer.attention.project(x, mem)
    gates = layer.route(x).gates.transpose(1, 2).unsqueeze(-1)
    want = layer.attention.merge_heads(attnlab.attention(q, k, v, "moh", impl="reference", gates=gates))
    torch.testing.assert_close(layer(x, mem).output, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shared_heads": 4, "top_k": 5}, "top_k must be <= the routed heads heads - shared_heads = 4, got 5"),
        ({"shared_heads": 8, "top_k": 1}, "top_k must be 0 when every head is shared"),
        ({"shared_heads": 9}, "shared_heads must be <= heads=8"),
        ({"shared_heads": -1}, "shared_heads must be a non-negative int"),
        ({"shared_heads": 2, "top_k": 0}, "top_k must be a positive int"),
        ({"gate_normalization": "mean"}, "gate_normalization must be 'code' or 'paper'"),
        ({"mechanism": "sliding_window", "window": -2}, "window must be a positive int"),
        ({"windw": 4}, "unknown option"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoHAttention(32, 8, **kwargs)


@settings(max_examples=30, deadline=None)
@given(
    heads=st.integers(1, 8),
    data=st.data(),
    norm=st.sampled_from(["code", "paper"]),
    T=st.integers(1, 6),
)
def test_property_gate_structure(heads, data, norm, T):
    shared = data.draw(st.integers(0, heads))
    routed = heads - shared
    K = data.draw(st.integers(1, routed)) if routed else 0
    torch.manual_seed(heads * 31 + shared * 7 + T)
    layer = MoHAttention(4 * heads, heads, shared_heads=shared, top_k=K, gate_normalization=norm).double()
    r = layer.route(torch.randn(2, T, 4 * heads, dtype=torch.float64))
    g = r.gates
    assert g.shape == (2, T, heads) and torch.isfinite(g).all()
    assert (g[..., :shared] > 0).all()  # shared heads always on
    assert torch.equal((g[..., shared:] != 0), r.selected)  # routed heads on exactly where selected
    assert (r.selected.sum(-1) == K).all()
    if norm == "code" and shared and routed:
        total = g[..., :shared].sum(-1) / shared + g[..., shared:].sum(-1) / K
        torch.testing.assert_close(total, torch.full_like(total, 2.0))
    elif norm == "code":  # one kind of head: its gates sum to its head count (K or h_s)
        torch.testing.assert_close(g.sum(-1), torch.full_like(g[..., 0], float(K or shared)))

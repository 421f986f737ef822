"""attnlab.nn.Attention: against hand-written MHA and torch.nn.MultiheadAttention, GQA, RoPE's
properties, every registered mechanism, and the build-time checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import registry
from attnlab.nn import Attention, RotaryEmbedding
from attnlab.nn.rope import rotate_half


def hand_mha(layer: Attention, x, kv=None, causal=False):
    """Projections, split heads, F.scaled_dot_product_attention, merge, output projection."""
    src = x if kv is None else kv
    B, T, _ = x.shape
    S, Dh = src.shape[1], layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(B, T, -1, Dh).transpose(1, 2)
    k = (src @ layer.k_proj.weight.T).view(B, S, -1, Dh).transpose(1, 2)
    v = (src @ layer.v_proj.weight.T).view(B, S, -1, Dh).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(B, T, -1) @ layer.o_proj.weight.T


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, None), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_dense_equals_hand_written_sdpa_mha(causal, heads, kv_heads):
    torch.manual_seed(0)
    layer = Attention(32, heads, kv_heads, causal=causal).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), hand_mha(layer, x, causal=causal), atol=1e-12, rtol=1e-12)
    assert layer.k_proj.out_features == (kv_heads or heads) * 8


def test_equals_torch_multihead_attention_with_copied_weights():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).double()
    layer = Attention(32, 4, bias=True).double()
    with torch.no_grad():
        for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
            proj.weight.copy_(ref.in_proj_weight[32 * i : 32 * (i + 1)])
            proj.bias.copy_(ref.in_proj_bias[32 * i : 32 * (i + 1)])
        layer.o_proj.weight.copy_(ref.out_proj.weight)
        layer.o_proj.bias.copy_(ref.out_proj.bias)
    x, mem = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 14, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x, x, x, need_weights=False)[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer(x, mem), ref(x, mem, mem, need_weights=False)[0], atol=1e-12, rtol=1e-12)


def test_cross_attention_with_its_own_kv_width():
    layer = Attention(32, 4, 2, kv_dim=12).double()
    x, mem = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x, mem), hand_mha(layer, x, mem))


# -- RoPE -----------------------------------------------------------------------------------------


def complex_rope(x, positions, base=10000.0):
    """The rotation written with complex numbers: channel pair (i, i + D/2) is the complex number
    x_i + j x_{i+D/2}, multiplied by exp(j p base^(-2i/D))."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.double().unsqueeze(-1) * theta
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_is_the_complex_rotation_of_channel_pairs():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 7, 100, 5, 3, 9999, 4, 12])
    torch.testing.assert_close(rope(x, pos), complex_rope(x, pos), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rope(x, offset=40), complex_rope(x, torch.arange(40, 50)), atol=1e-12, rtol=1e-12)
    assert torch.equal(rotate_half(rotate_half(x)), -x)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(8, base=500.0)
    q, k = torch.randn(2, 1, 2, 6, 8, dtype=torch.float64)
    pq, pk = torch.tensor([3, 5, 8, 9, 20, 21]), torch.tensor([0, 1, 2, 3, 4, 5])
    scores = rope(q, pq) @ rope(k, pk).transpose(-1, -2)
    for shift in (1, 17, 1000):
        shifted = rope(q, pq + shift) @ rope(k, pk + shift).transpose(-1, -2)
        torch.testing.assert_close(shifted, scores, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(rope(q, pq + 1) @ rope(k, pk).transpose(-1, -2), scores)  # absolute shift of q alone


def test_rope_decoding_with_offset_is_bitwise_the_full_sequence_row():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 33, 8)
    full = rope(x)
    for t in (0, 1, 16, 32):
        assert torch.equal(rope(x[:, :, t : t + 1], offset=t), full[:, :, t : t + 1])
        assert torch.equal(rope(x[:, :, t:], positions=torch.arange(t, 33)), full[:, :, t:])


def test_rope_tables_are_cached_per_device_and_dtype_and_grow():
    rope = RotaryEmbedding(8)
    rope(torch.randn(1, 1, 5, 8))
    rope(torch.randn(1, 1, 5, 8, dtype=torch.float64))
    assert {d for _, d in rope._cache} == {torch.float32, torch.float64}
    cos, _ = rope.tables(5, "cpu", torch.float32)
    assert cos.shape[0] == 8 and rope.tables(3, "cpu", torch.float32)[0] is cos  # reused, not rebuilt
    assert rope.tables(9, "cpu", torch.float32)[0].shape[0] == 16


@pytest.mark.parametrize("mechanism", ["dense", "sliding_window"])
def test_layer_rope_is_relative_and_decoding_matches_the_full_pass(mechanism):
    torch.manual_seed(1)
    opts = {"window": 4} if mechanism == "sliding_window" else {}
    layer = Attention(32, 4, 2, mechanism, rope=True, causal=True, **opts).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    full = layer(x)
    pos = torch.arange(12)
    torch.testing.assert_close(layer(x, positions=pos + 50, kv_positions=pos + 50), full)
    for t in (1, 7, 12):  # one new token attending its whole prefix: bottom-right positions
        torch.testing.assert_close(layer(x[:, t - 1 : t], kv=x[:, :t]), full[:, t - 1 : t])
    plain = Attention(32, 4, 2, mechanism, causal=True, **opts).double()
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(plain(x), full)  # RoPE changes the layer


def test_rope_with_more_queries_than_keys_shifts_both_sides():
    layer = Attention(16, 2, rope=True).double()
    x, mem = torch.randn(1, 9, 16, dtype=torch.float64), torch.randn(1, 4, 16, dtype=torch.float64)
    explicit = layer(x, mem, positions=torch.arange(9), kv_positions=torch.arange(5, 9))
    torch.testing.assert_close(layer(x, mem), explicit)


# -- every registered mechanism -----------------------------------------------------------------


def _self_pattern(mech) -> bool | None:
    for causal in (False, True):
        if registry.pattern(8, 8, causal) in mech.patterns:
            return causal
    return None


@pytest.mark.parametrize("name", attnlab.names())
def test_every_mechanism_runs_in_the_layer_with_gradients(name):
    mech = attnlab.get(name)
    causal = _self_pattern(mech)
    if causal is None:
        pytest.skip(f"{name} serves no self-attention pattern")
    torch.manual_seed(0)
    T = 36
    layer = Attention(32, 4, 2, name, rope=True, causal=causal, **mech.example(T)).double()
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    q, k, v = layer.project(x)  # the layer is its projections around attnlab.attention
    want = layer.merge_heads(attnlab.attention(q, k, v, name, causal=causal, impl="reference", **mech.example(T)))
    torch.testing.assert_close(y, want, atol=1e-9, rtol=1e-9)
    cross_T = 20  # cross attention over the same S keys, where the mechanism serves it
    if registry.pattern(cross_T, T, causal) in mech.patterns:
        y_cross = layer(x[:, :cross_T] * 0.5, kv=x)
        q, k, v = layer.project(x[:, :cross_T] * 0.5, kv=x)
        ref = attnlab.attention(q, k, v, name, causal=causal, impl="reference", **mech.example(T))
        torch.testing.assert_close(y_cross, layer.merge_heads(ref), atol=1e-9, rtol=1e-9)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# -- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((30, 4), {}, "dim=30 must be divisible by heads=4"),
        ((32, 4, 3), {}, "heads=4 must be divisible by kv_heads=3"),
        ((32, 0), {}, "heads must be a positive int"),
        ((32, 4, None, "nope"), {}, "unknown mechanism 'nope'; valid: dense"),
        ((32, 4, None, "sliding_window"), {"windw": 3}, r"unknown option\(s\) \['windw'\]; it accepts: window"),
        ((32, 4, None, "dense"), {"window": 3}, r"unknown option\(s\) \['window'\]; it accepts: none"),
        ((32, 4, None, "sliding_window"), {"window": 0}, "window must be a positive int"),
        ((32, 4, None, "halo"), {"causal": True, "shape": (4, 4)}, "halo cannot run with causal=True"),
        ((32, 4, None, "prefix_lm"), {}, "prefix_lm cannot run with causal=False"),
        ((32, 4, None, "neighborhood"), {"shape": (4, 4), "kernel_size": 5}, "kernel_size \\* dilation must be <="),
        ((32, 4, None, "document"), {"lengths": (3, 0)}, "lengths must be positive ints"),
        ((20, 4), {"rope": True}, "rope needs an even positive head_dim, got 5"),
        ((32, 4), {"rope": True, "rope_base": 1.0}, "rope_base must be a number > 1"),
    ],
)
def test_bad_arguments_fail_at_build_time(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(*args, **kwargs)


def test_causal_must_be_a_bool_or_per_axis_bools_where_the_mechanism_has_axes():
    with pytest.raises(TypeError, match="causal must be a bool"):
        Attention(32, 4, causal=1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        Attention(32, 4, causal=(True, False))
    grid = Attention(16, 2, None, "neighborhood", causal=(True, False), shape=(4, 6), kernel_size=3).double()
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    y = grid(x)
    x2 = x.clone()
    x2[:, 18:] += 1.0  # the last grid row: rows above never see it when axis 0 is causal
    torch.testing.assert_close(grid(x2)[:, :18], y[:, :18], atol=0, rtol=0)


def test_length_bound_options_are_checked_at_their_length_and_at_each_call():
    layer = Attention(16, 2, None, "neighborhood", shape=(4, 6), kernel_size=3)  # fits T = 24 only
    assert layer(torch.randn(1, 24, 16)).shape == (1, 24, 16)
    with pytest.raises(ValueError, match="prod\\(shape\\)=24"):
        layer(torch.randn(1, 20, 16))


def test_bad_forward_inputs():
    layer = Attention(16, 2)
    with pytest.raises(ValueError, match="x must be \\[B, T, dim=16\\]"):
        layer(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="kv must be \\[B=1, S, kv_dim=16\\]"):
        layer(torch.randn(1, 5, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="only apply to a layer built with rope=True"):
        layer(torch.randn(1, 5, 16), positions=torch.arange(5))
    roped = Attention(16, 2, rope=True)
    with pytest.raises(ValueError, match="positions must be \\[T=5\\] or \\[B=1, T=5\\]"):
        roped(torch.randn(1, 5, 16), positions=torch.arange(4))
    with pytest.raises(ValueError, match="kv_positions must be an integer tensor"):
        roped(torch.randn(1, 5, 16), kv_positions=torch.arange(5.0))


# -- property ----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3)]),
    head_dim=st.sampled_from([2, 4, 6]),
    T=st.integers(1, 12),
    S=st.integers(1, 12),
    causal=st.booleans(),
    cross=st.booleans(),
)
def test_property_layer_is_sdpa_mha(heads_kv, head_dim, T, S, causal, cross):
    heads, kv_heads = heads_kv
    torch.manual_seed(T * 13 + S)
    layer = Attention(heads * head_dim, heads, kv_heads, causal=causal).double()
    x = torch.randn(2, T, heads * head_dim, dtype=torch.float64)
    kv = torch.randn(2, S, heads * head_dim, dtype=torch.float64) if cross else None
    got = layer(x, kv)
    S_ = S if cross else T
    # bottom-right causal == SDPA's top-left mask shifted by S - T; rows with no key are 0
    q, k, v = layer.project(x, kv)
    m = torch.ones(T, S_, dtype=torch.bool).tril(S_ - T) if causal else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=heads != kv_heads)
    if m is not None:
        o = torch.where(m.any(-1).view(1, 1, T, 1), o, 0)
    torch.testing.assert_close(got, layer.merge_heads(o), atol=1e-10, rtol=1e-10)

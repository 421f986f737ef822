"""Differential attention (DIFF) and its grouped form (GDA): the functional core against the oracle
and against the math written out, and the layer against unilm's naive form."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms import differential
from attnlab.nn import DifferentialAttention
from attnlab.nn.differential import lambda_init_for
from attnlab.testing import LargestTensor, compare_to_reference


def qkv(B=1, H=4, Hkv=2, T=11, S=11, D=8, Dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64).to(dtype),
    )


def naive_diff(q, k, v, lam, causal):
    """The DIFF formula head by head, fp64, bottom-right causal: (A1 − λ A2) V."""
    B, H, T, D = q.shape
    Hkv, S, d = k.shape[1], k.shape[2], D // 2
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        kv = h // (H // Hkv)
        maps = []
        for half in (slice(0, d), slice(d, D)):
            logits = q[:, h, :, half] @ k[:, kv, :, half].transpose(-1, -2) / math.sqrt(d)
            maps.append(torch.softmax(logits.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0))
        lam_h = lam[h] if isinstance(lam, torch.Tensor) else lam
        out[:, h] = (maps[0] - lam_h * maps[1]) @ v[:, kv]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "S"), [(11, 11), (5, 13), (13, 5)])
def test_group_one_is_the_diff_formula(causal, T, S):
    q, k, v = qkv(T=T, S=S)
    lam = torch.tensor([0.3, -0.2, 0.8, 1.1], dtype=torch.float64)
    for lam_ in (0.55, lam):
        got = attnlab.attention(q, k, v, "differential", causal=causal, lam=lam_, groups=1)
        torch.testing.assert_close(got, naive_diff(q, k, v, lam_, causal), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_groups_share_the_mean_noise_query_and_equal_diff_when_members_agree(causal):
    q, k, v = qkv(H=8, Hkv=2, T=9, S=12)
    d = q.shape[-1] // 2
    for G in (2, 4):
        # DIFF with every member's noise half replaced by its group's mean is GDA with G:1
        q_shared = q.clone()
        q_shared[..., d:] = differential.group_noise_queries(q[..., d:], G).repeat_interleave(G, dim=1)
        gda = attnlab.attention(q, k, v, "differential", causal=causal, lam=0.6, groups=G)
        diff = attnlab.attention(q_shared, k, v, "differential", causal=causal, lam=0.6, groups=1)
        torch.testing.assert_close(gda, diff, atol=1e-12, rtol=1e-12)
        assert not torch.allclose(gda, attnlab.attention(q, k, v, "differential", causal=causal, lam=0.6))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "S", "H", "Hkv"), [(10, 10, 4, 4), (7, 15, 4, 2), (15, 7, 6, 3)])
def test_lambda_zero_is_plain_attention_over_the_signal_heads(causal, T, S, H, Hkv):
    q, k, v = qkv(H=H, Hkv=Hkv, T=T, S=S, D=12)
    got = attnlab.attention(q, k, v, "differential", causal=causal, lam=0.0)
    want = attnlab.attention(q[..., :6], k[..., :6], v, causal=causal)  # d**-0.5 is the default scale of d
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("causal", "T", "S"), [(False, 11, 11), (True, 11, 11), (True, 7, 13), (True, 13, 7)])
def test_maps_have_each_softmax_lse_and_subtract_into_the_output(causal, T, S):
    """differential has no LSE (attention_lse refuses it), but each map is one softmax: ``maps``
    returns both with their LSEs, equal to the dense oracle's (GDA groups, GQA, causal cross)."""
    from attnlab import reference

    q, k, v = qkv(H=4, Hkv=2, T=T, S=S)
    signal, noise = differential.maps(q, k, v, causal=causal, groups=2, lam=0.3)
    d = q.shape[-1] // 2
    q2 = q[..., d:].unflatten(1, (2, 2)).mean(2)  # [B, H/G, T, d]: each group's mean noise query
    want = (
        reference.attention(q[..., :d], k[..., :d], v, causal=causal, scale=d**-0.5),
        reference.attention(q2, k[..., d:], v, causal=causal, scale=d**-0.5),
    )
    for got, ref in zip((signal, noise), want):
        torch.testing.assert_close(got.out, ref.out, atol=1e-12, rtol=1e-12)
        empty = torch.isneginf(ref.lse)
        assert torch.equal(torch.isneginf(got.lse), empty) and empty.any() == (causal and T > S)
        torch.testing.assert_close(got.lse[~empty], ref.lse[~empty], atol=1e-12, rtol=1e-12)
    out = attnlab.attention(q, k, v, "differential", causal=causal, groups=2, lam=0.3)
    torch.testing.assert_close(out, signal.out - 0.3 * noise.out.repeat_interleave(2, dim=1), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        differential.maps(q, k, v, groups=4)


def test_identical_maps_with_lambda_one_cancel_and_empty_rows_are_zero():
    q, k, v = qkv(T=9, S=4)
    q, k = torch.cat([q[..., :4]] * 2, -1), torch.cat([k[..., :4]] * 2, -1)
    out = attnlab.attention(q, k, v, "differential", causal=True, lam=1.0)
    assert out.abs().max() < 1e-14
    q, k, v = (t.requires_grad_() for t in qkv(T=9, S=4, H=4, Hkv=1))
    out = attnlab.attention(q, k, v, "differential", causal=True, lam=0.5, groups=2)  # rows 0-4 see no key
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5])) and out[:, :, 5:].abs().min() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "S", "H", "Hkv", "G"), [(13, 13, 8, 2, 4), (9, 21, 4, 1, 2), (21, 9, 6, 2, 3)])
def test_grouped_fast_path_matches_oracle(dtype, causal, T, S, H, Hkv, G):
    q, k, v = qkv(B=2, H=H, Hkv=Hkv, T=T, S=S, D=16, Dv=16, dtype=dtype)
    for lam in (0.8, torch.linspace(-0.5, 1.0, H, dtype=dtype)):
        assert not compare_to_reference("differential", q, k, v, causal=causal, lam=lam, groups=G)


def test_bf16_grouped_matches_oracle():
    q, k, v = qkv(B=2, H=4, Hkv=2, T=17, S=23, D=16, Dv=16, dtype=torch.bfloat16)
    assert not compare_to_reference("differential", q, k, v, causal=True, lam=0.7, groups=2)


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_lambda_gradient_matches_oracle(causal):
    q, k, v = qkv(H=4, Hkv=2, T=8, S=12, D=8)
    grads = []
    for impl in ("auto", "reference"):
        lam = torch.tensor([0.2, 0.5, 0.9, -0.3], dtype=torch.float64, requires_grad=True)
        out = attnlab.attention(q, k, v, "differential", causal=causal, lam=lam, groups=2, impl=impl)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(lam.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-12)
    assert grads[0].abs().min() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_oracle_gradcheck(causal):
    q, k, v = (t.requires_grad_() for t in qkv(H=4, Hkv=2, T=4, S=5, D=4, Dv=3))
    lam = torch.tensor([0.3, 0.7, -0.1, 0.5], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, lam):
        return differential.oracle(q, k, v, causal=causal, lam=lam, groups=2).out

    assert torch.autograd.gradcheck(f, (q, k, v, lam))


def test_fast_path_never_materializes_t_by_s():
    """Self (the fused kernel) and bottom-right causal cross (the executor), forward and backward."""
    for T, S, causal in ((512, 512, False), (512, 512, True), (512, 1024, True)):
        q, k, v = (t.requires_grad_() for t in qkv(H=2, Hkv=1, T=T, S=S, D=16, Dv=16, dtype=torch.float32))
        attnlab.attention(q, k, v, "differential", causal=causal, groups=2)  # builds and caches the layout
        with LargestTensor() as probe:
            attnlab.attention(q, k, v, "differential", causal=causal, groups=2).sum().backward()
        assert probe.numel <= T * S // 8, (T, S, causal, probe.numel)  # one query block x all keys at most


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    per_kv=st.sampled_from([1, 2, 4]),
    G=st.sampled_from([1, 2, 4]),
    T=st.integers(1, 19),
    S=st.integers(1, 19),
    d=st.integers(1, 5),
    Dv=st.integers(1, 7),
    causal=st.booleans(),
    lam=st.floats(-2.0, 2.0),
    per_head=st.booleans(),
)
def test_fuzz_fast_path_matches_oracle(B, Hkv, per_kv, G, T, S, d, Dv, causal, lam, per_head):
    if per_kv % G:
        G = 1
    H = Hkv * per_kv
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, T=T, S=S, D=2 * d, Dv=Dv, seed=T * 31 + S)
    lam_ = torch.linspace(lam, -lam, H, dtype=torch.float64) if per_head else lam
    assert not compare_to_reference("differential", q, k, v, causal=causal, lam=lam_, groups=G)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"groups": 3}, r"groups=3 must divide the query heads per kv head H/Hkv=2"),
        ({"groups": 4}, r"groups=4 must divide"),  # divides H=4 but a noise map would span kv groups
        ({"groups": 0}, r"groups must be a positive int"),
        ({"lam": torch.ones(3)}, r"lam must be a float or a floating tensor of shape \[\] or \[H=4\]"),
        ({"lam": torch.ones(4, 1)}, r"lam must be a float or a floating tensor of shape \[\] or \[H\]"),
        ({"lam": torch.ones(4, dtype=torch.long)}, r"lam must be a float or a floating tensor"),
        ({"lam": float("nan")}, r"lam must be a finite float"),
        ({"lam": True}, r"lam must be a finite float"),
        ({"window": 4}, r"differential got unknown option"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = qkv()
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match=match):
            attnlab.attention(q, k, v, "differential", impl=impl, **opts)


def test_odd_head_dim_and_bad_split_inputs():
    q, k, v = qkv(D=7)
    with pytest.raises(ValueError, match=r"head dim must be even .* got D=7"):
        attnlab.attention(q, k, v, "differential")
    q, k, v = qkv(D=8)
    with pytest.raises(ValueError, match=r"q_noise must be \[B=1, H/G, T=11, d=4\]"):
        differential.split_attention(q[..., :4], q[:, :3, :, 4:], k[..., :4], k[..., 4:], v)
    with pytest.raises(ValueError, match=r"k_noise must have k_signal's shape"):
        differential.split_attention(q[..., :4], q[:, :2, :, 4:], k[..., :4], k[:, :1, :, 4:], v)


# -- the layer ---------------------------------------------------------------------------------------


def test_lambda_init_schedules():
    assert lambda_init_for(0) == pytest.approx(0.2)  # unilm: depth = 0-based layer index
    assert lambda_init_for(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_for(11) == pytest.approx(0.8 - 0.6 * math.exp(-3.3))
    assert lambda_init_for(0, "motif") == pytest.approx(0.8 - 0.6 * math.exp(0.3))  # shifted by one
    assert lambda_init_for(1, "motif") == pytest.approx(0.2)
    assert DifferentialAttention(32, 2, layer_idx=5).lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-1.5))
    assert DifferentialAttention(32, 2, layer_idx=5, lambda_init=0.4).lambda_init == 0.4


def test_lambda_reparameterization_value_and_gradient():
    m = DifferentialAttention(32, 2, layer_idx=3)
    with torch.no_grad():
        for p, val in zip((m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2), (0.1, 0.2, -0.3, 0.05)):
            p.fill_(val)
    d = m.head_dim
    want = math.exp(0.02 * d) - math.exp(-0.015 * d) + lambda_init_for(3)
    assert m.lam().item() == pytest.approx(want, rel=1e-6)
    m.lam().backward()
    assert m.lambda_q1.grad[0].item() == pytest.approx(0.2 * math.exp(0.02 * d), rel=1e-6)
    assert m.lambda_q2.grad[0].item() == pytest.approx(-0.05 * math.exp(-0.015 * d), rel=1e-6)


def unilm_naive(m: DifferentialAttention, x):
    """unilm's naive DIFF layer, from m's weights: 2H query heads of width d in adjacent pairs; under
    GQA the (K1, K2) pair of kv group g(i) serves the pair (Q1_i, Q2_i) (spec §2A)."""
    B, T, _ = x.shape
    H, Hkv, d = m.heads, m.kv_heads, m.head_dim
    q = m.q_proj(x).view(B, T, 2 * H, d).transpose(1, 2)
    k = m.k_proj(x).view(B, T, Hkv, 2, d).repeat_interleave(H // Hkv, dim=2).view(B, T, 2 * H, d).transpose(1, 2)
    v = m.v_proj(x).view(B, T, Hkv, 2 * d).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if m.causal:
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    a = torch.softmax(logits, -1).view(B, H, 2, T, T)
    with torch.no_grad():  # unilm computes λ in fp32
        lq1, lk1, lq2, lk2 = (p.float() for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2))
        lam = (torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + m.lambda_init).item()
    h = (a[:, :, 0] - lam * a[:, :, 1]) @ v
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight
    return m.out_proj((h * (1 - m.lambda_init)).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize(("heads", "kv_heads", "causal"), [(4, None, True), (4, 2, False), (2, 1, True)])
def test_layer_matches_unilm_naive_form(heads, kv_heads, causal):
    torch.manual_seed(0)
    m = DifferentialAttention(48, heads, kv_heads, layer_idx=2, causal=causal).double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), unilm_naive(m, x), atol=1e-12, rtol=1e-12)


def test_grouped_layer_is_diff_with_duplicated_noise_heads():
    """GDA (G=2) equals DIFF whose per-head noise projections copy their group's noise projection."""
    torch.manual_seed(1)
    gda = DifferentialAttention(32, 4, 2, groups=2, head_dim=4, layer_idx=1).double()
    diff = DifferentialAttention(32, 4, 2, groups=1, head_dim=4, layer_idx=1).double()
    diff.load_state_dict({k: v for k, v in gda.state_dict().items() if not k.startswith("q_proj")}, strict=False)
    w = gda.q_proj.weight.view(2, 3, 4, 32)  # [noise groups, 2 signal + 1 noise, d, dim]
    pairs = [torch.cat([w[i // 2, i % 2], w[i // 2, 2]]) for i in range(4)]  # [Q1_i; Q2_group(i)]
    with torch.no_grad():
        diff.q_proj.weight.copy_(torch.cat(pairs))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(gda(x), diff(x), atol=1e-12, rtol=1e-12)
    assert gda.q_proj.weight.shape[0] == (4 + 2) * 4 < diff.q_proj.weight.shape[0]


def test_layer_with_zero_lambda_is_normed_signal_attention_and_is_causal():
    torch.manual_seed(2)
    m = DifferentialAttention(32, 2, lambda_init=0.0).double()
    with torch.no_grad():
        for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2):
            p.zero_()  # λ = e⁰ − e⁰ + 0 = 0
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    q = m.q_proj(x).view(1, 9, 2, 2, 8)[:, :, :, 0].transpose(1, 2)
    k = m.k_proj(x).view(1, 9, 2, 2, 8)[:, :, :, 0].transpose(1, 2)
    v = m.v_proj(x).view(1, 9, 2, 16).transpose(1, 2)
    h = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = m.out_proj(m.norm(h).transpose(1, 2).reshape(1, 9, 32))
    torch.testing.assert_close(m(x), want, atol=1e-12, rtol=1e-12)
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6], atol=0, rtol=0)
    assert not torch.allclose(m(x2)[:, 6:], y[:, 6:])


def test_layer_trains_in_fp32():
    m = DifferentialAttention(64, 4, groups=2)
    x = torch.randn(2, 17, 64)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": 4, "groups": 3}, r"groups=3 must divide heads=4"),
        ({"heads": 4, "kv_heads": 3}, r"kv_heads=3 must divide heads=4"),
        ({"heads": 4, "kv_heads": 4, "groups": 2}, r"groups=2 must divide heads/kv_heads"),
        ({"heads": 4, "groups": 0}, r"groups must be a positive int"),
        ({"heads": 40}, r"head_dim .* must be a positive int"),
        ({"heads": 2, "lambda_init_schedule": "paper"}, r"lambda_init_schedule must be one of unilm, motif"),
        ({"heads": 2, "layer_idx": -1}, r"layer_idx must be a non-negative int"),
        ({"heads": 2, "lambda_init": float("inf")}, r"lambda_init must be a finite float"),
    ],
)
def test_layer_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifferentialAttention(64, **kwargs)


def test_layer_bad_input():
    with pytest.raises(ValueError, match=r"x must be \[B, T, dim=64\]"):
        DifferentialAttention(64, 4)(torch.randn(2, 5, 32))

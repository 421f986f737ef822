"""DHA: decoupled key/value head groupings (runtime), and MHA -> DHA conversion."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import convert
from attnlab.bench.figures.dha import prototype_mha
from attnlab.mechanisms import dha
from attnlab.nn import DecoupledHeadAttention
from attnlab.testing import TOLERANCES


def rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def by_hand(q, k, v, key_groups, value_groups, causal):
    """Per-head loop, straight from O_h = softmax(Q_h K_{cK(h)}^T / sqrt(D) + M) V_{cV(h)}."""
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    outs = []
    for h in range(q.shape[1]):
        logits = q[:, h] @ k[:, key_groups[h]].transpose(-1, -2) / q.shape[-1] ** 0.5
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        outs.append(weights @ v[:, value_groups[h]])
    return torch.stack(outs, dim=1)


@contextlib.contextmanager
def per_group_size_calls(on: bool):
    """Force the one-call-per-group-size path on CPU (the path GPUs take) when ``on``."""
    saved = dha.GATHER_ON_CPU
    dha.GATHER_ON_CPU = not on
    try:
        yield
    finally:
        dha.GATHER_ON_CPU = saved


# -- runtime ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "S"), [(11, 11), (7, 13), (13, 7)])
@pytest.mark.parametrize(("H", "Hkv", "groups"), [(4, 4, (0, 1, 2, 3)), (6, 2, (0, 0, 0, 1, 1, 1)), (4, 1, (0,) * 4)])
def test_mha_gqa_mqa_groupings_are_standard_attention(H, Hkv, groups, T, S, causal):
    q, k, v = rand(2, H, T, 8), rand(2, Hkv, S, 8), rand(2, Hkv, S, 5)
    want = attnlab.attention(q, k, v, "dense", causal=causal)
    for opts in ({"key_groups": groups, "value_groups": groups}, {}, {"key_groups": "contiguous"}):
        got = dha.attention(q, k, v, causal=causal, **opts).out
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if not causal or T == S:  # SDPA aligns causal top-left: only comparable for self-attention
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv)
        torch.testing.assert_close(dha.attention(q, k, v, causal=causal).out, sdpa)


@pytest.mark.parametrize("causal", [False, True])
def test_decoupled_groupings_equal_a_hand_computation(causal):
    # 5 query heads over 3 key heads (sizes 2, 2, 1) and 2 value heads (sizes 3, 2), not contiguous
    key_groups, value_groups = (2, 0, 1, 0, 1), (1, 0, 1, 0, 0)
    q, k, v = rand(2, 5, 9, 8), rand(2, 3, 12, 8), rand(2, 2, 12, 6)
    got = dha.attention(q, k, v, causal=causal, key_groups=key_groups, value_groups=value_groups)
    want = by_hand(q, k, v, key_groups, value_groups, causal)
    torch.testing.assert_close(got.out, want, atol=1e-12, rtol=1e-12)
    ref = dha.oracle(q, k, v, causal=causal, key_groups=key_groups, value_groups=value_groups)
    torch.testing.assert_close(got.lse, ref.lse)


def test_plan_runs_one_dense_call_per_group_size_and_skips_copies_for_gqa():
    buckets, inverse = dha.plan((0, 0, 1, 1), (0, 0, 1, 1))
    assert inverse is None and buckets == (dha.Bucket((0, 1, 2, 3), (0, 1), (0, 1)),)  # no gather, no permute
    buckets, inverse = dha.plan((0, 1, 0, 1, 2), (0, 0, 0, 1, 1))
    assert [len(b.heads) // len(b.keys) for b in buckets] == [2, 1]  # pair (0,0) x2; (1,0), (1,1), (2,1) x1
    assert inverse is not None and sorted(h for b in buckets for h in b.heads) == list(range(5))


@pytest.mark.parametrize("split", [False, True], ids=["gathered", "per-size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("T", "S", "causal"), [(10, 10, True), (12, 7, True), (6, 11, False)])
def test_forward_and_grads_match_the_oracle(dtype, T, S, causal, split):
    key_groups, value_groups = (1, 0, 2, 2, 0, 1), (0, 1, 1, 0, 1, 1)
    leaves = [rand(2, 6, T, 8, dtype=dtype), rand(2, 3, S, 8, dtype=dtype), rand(2, 2, S, 4, dtype=dtype)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    opts = {"causal": causal, "key_groups": key_groups, "value_groups": value_groups}
    with per_group_size_calls(split):
        got = dha.attention(*leaves, **opts)
    want = dha.oracle(*ref_leaves, **opts)
    (o_atol, o_rtol), (g_atol, g_rtol) = TOLERANCES[dtype]
    torch.testing.assert_close(got.out, want.out, atol=o_atol, rtol=o_rtol)
    if T > S and causal:
        assert (got.out[:, :, : T - S] == 0).all()  # rows with no key
    up = torch.randn_like(got.out)
    for a, b in zip(torch.autograd.grad(got.out, leaves, up), torch.autograd.grad(want.out, ref_leaves, up)):
        torch.testing.assert_close(a, b, atol=g_atol, rtol=g_rtol)


def test_gradcheck_fast_path_and_oracle():
    q, k, v = rand(1, 3, 3, 2, grad=True), rand(1, 2, 4, 2, grad=True), rand(1, 2, 4, 2, grad=True)
    opts = {"causal": True, "key_groups": (1, 0, 1), "value_groups": (0, 0, 1)}  # two group sizes
    for split in (False, True):
        with per_group_size_calls(split):
            assert torch.autograd.gradcheck(lambda *t: dha.attention(*t, **opts).out, (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: dha.oracle(*t, **opts).out, (q, k, v))


@st.composite
def groupings(draw):
    H = draw(st.integers(1, 7))

    def cover(n):  # every kv head once, the other H - n query heads anywhere, shuffled
        extra = draw(st.lists(st.integers(0, n - 1), min_size=H - n, max_size=H - n))
        return draw(st.permutations(list(range(n)) + extra))

    Hk, Hv = draw(st.integers(1, H)), draw(st.integers(1, H))
    return H, Hk, Hv, tuple(cover(Hk)), tuple(cover(Hv))


@settings(max_examples=40, deadline=None)
@given(groupings(), st.integers(1, 9), st.integers(1, 9), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_fuzz_groupings_against_the_oracle(g, T, S, causal, split, seed):
    H, Hk, Hv, key_groups, value_groups = g
    torch.manual_seed(seed)
    q, k, v = rand(1, H, T, 4), rand(1, Hk, S, 4), rand(1, Hv, S, 3)
    opts = {"causal": causal, "key_groups": key_groups, "value_groups": value_groups}
    with per_group_size_calls(split):
        got = dha.attention(q, k, v, **opts)
    want = dha.oracle(q, k, v, **opts)
    torch.testing.assert_close(got.out, want.out, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    torch.testing.assert_close(got.out, by_hand(q, k, v, key_groups, value_groups, causal), atol=1e-10, rtol=1e-10)


def test_registered_mechanism_with_explicit_groupings():
    q, k, v = rand(1, 4, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    opts = {"key_groups": [1, 0, 0, 1], "value_groups": torch.tensor([0, 1, 1, 1])}
    got = attnlab.attention(q, k, v, "dha", causal=True, **opts)
    torch.testing.assert_close(got, attnlab.attention(q, k, v, "dha", causal=True, impl="reference", **opts))
    torch.testing.assert_close(got, by_hand(q, k, v, (1, 0, 0, 1), (0, 1, 1, 1), True))
    assert torch.equal(attnlab.mask("dha", 3, 5, causal=True), attnlab.mask("dense", 3, 5, causal=True))


@pytest.mark.parametrize(
    ("opts", "Hk", "Hv", "match"),
    [
        ({"key_groups": (0, 1, 0)}, 2, 2, "key_groups must give one kv head per query head \\(length 4\\)"),
        ({"key_groups": (0, 1, 2, 0)}, 2, 2, "key_groups must index the 2 kv heads 0..1, got 2"),
        ({"value_groups": (0, 0, 2, 2)}, 2, 3, "value_groups must partition .* kv head\\(s\\) \\[1\\] unused"),
        ({"key_groups": (0, -1, 0, 1)}, 2, 2, "key_groups entries must be non-negative ints"),
        ({"key_groups": (0, 1.0, 0, 1)}, 2, 2, "key_groups entries must be non-negative ints"),
        ({"value_groups": "interleaved"}, 2, 2, "value_groups must be None, 'contiguous' or 'strided'"),
        ({"value_groups": ()}, 2, 2, "value_groups must be a non-empty sequence"),
        ({"key_groups": torch.zeros(2, 2, dtype=torch.long)}, 2, 2, "key_groups as a tensor must be 1-D integer"),
        ({}, 3, 2, "key_groups=contiguous needs the 4 query heads to be a multiple of the 3 kv heads"),
        ({"key_groups": "strided"}, 5, 2, "key_groups must partition .* unused"),
    ],
)
def test_bad_groupings_raise(opts, Hk, Hv, match):
    q, k, v = rand(1, 4, 5, 8), rand(1, Hk, 5, 8), rand(1, Hv, 5, 8)
    with pytest.raises(ValueError, match=match):
        dha.attention(q, k, v, **opts)
    if Hk == Hv:
        with pytest.raises(ValueError, match=match):
            attnlab.attention(q, k, v, "dha", **opts)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected q \\[B,H,T,D\\], k \\[B,Hk,S,D\\]"):
        dha.attention(rand(1, 2, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 6, 8))
    with pytest.raises(ValueError, match="4-D"):
        dha.attention(rand(2, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8))


# -- the module --------------------------------------------------------------------------------------


def test_module_equals_projections_around_the_core():
    torch.manual_seed(0)
    groups = {"key_groups": (0, 1, 2, 1, 0, 2), "value_groups": (0, 0, 1, 1, 1, 1)}
    m = DecoupledHeadAttention(24, 6, bias=True, **groups).double()
    assert (m.key_heads, m.value_heads, m.kv_cache_width) == (3, 2, 3 * 4 + 2 * 4)
    x, ctx = rand(2, 5, 24), rand(2, 7, 24)
    q = m.q_proj(x).view(2, 5, 6, 4).transpose(1, 2)
    k = m.k_proj(ctx).view(2, 7, 3, 4).transpose(1, 2)
    v = m.v_proj(ctx).view(2, 7, 2, 4).transpose(1, 2)
    o = by_hand(q, k, v, m.key_groups, m.value_groups, causal=True)
    torch.testing.assert_close(m(x, ctx, causal=True), m.o_proj(o.transpose(1, 2).reshape(2, 5, 24)))


def test_module_defaults_are_mha_and_gqa():
    for kv in (None, 3, 1):
        m = DecoupledHeadAttention(24, 6, kv_heads=kv)
        n = kv or 6
        assert m.key_groups == m.value_groups == tuple(h // (6 // n) for h in range(6)) and m.key_heads == n


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_groups": (0, 2, 2, 0)}, "key_groups must partition .* \\[1\\] unused"),
        ({"key_groups": (0, 1, 0)}, "key_groups must give one kv head per query head"),
        ({"key_groups": "strided"}, "key_groups must be a sequence of 4 kv-head indices here"),
        ({"value_groups": (0, 0, 0, 5)}, "value_groups must partition"),
        ({"kv_heads": 3}, "heads=4 must be a multiple of kv_heads=3"),
        ({"kv_heads": 2, "key_groups": (0, 0, 1, 1)}, "give kv_heads .* or key_groups, not both"),
        ({"head_dim": 0}, "head_dim must be a positive int"),
    ],
)
def test_module_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoupledHeadAttention(16, 4, **kwargs)


def test_module_bad_inputs_raise():
    m = DecoupledHeadAttention(16, 4)
    with pytest.raises(ValueError, match="x must be \\[B, T, dim=16\\]"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="context must be"):
        m(torch.randn(2, 5, 16), torch.randn(3, 5, 16))


# -- conversion ----------------------------------------------------------------------------------------


class PlainMHA(torch.nn.Module):
    """A minimal MHA layer of the documented protocol: ``heads`` and four nn.Linear projections."""

    def __init__(self, dim, heads, kv_heads=None, bias=True):
        super().__init__()
        self.heads, self.kv_heads, D = heads, kv_heads or heads, dim // heads
        self.q_proj, self.o_proj = torch.nn.Linear(dim, dim, bias=bias), torch.nn.Linear(dim, dim, bias=bias)
        self.k_proj = torch.nn.Linear(dim, self.kv_heads * D, bias=bias)
        self.v_proj = torch.nn.Linear(dim, self.kv_heads * D, bias=bias)

    def forward(self, x, causal=False):
        split = lambda t: t.unflatten(-1, (-1, x.shape[-1] // self.heads)).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(o.transpose(1, 2).flatten(2))


def mha_modules(dim=32, heads=4, bias=True):
    """The same MHA layer as nn.MultiheadAttention and as an MHA-like module (identity DHA)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True).double()
    ours = DecoupledHeadAttention(dim, heads, bias=bias).double()
    plain = PlainMHA(dim, heads, bias=bias).double()
    with torch.no_grad():
        for name, w in zip(("q_proj", "k_proj", "v_proj"), ref.in_proj_weight.split(dim)):
            getattr(ours, name).weight.copy_(w)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), ref.in_proj_bias.split(dim)):
                getattr(ours, name).bias.copy_(b)
            ours.o_proj.bias.copy_(ref.out_proj.bias)
    plain.load_state_dict(ours.state_dict())
    return ref, ours, plain


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["cluster", "mean"])
def test_to_dha_with_all_heads_reproduces_the_original(method, bias):
    x = rand(2, 9, 32)
    for original in mha_modules(bias=bias):
        converted = convert.to_dha(original, 4, method=method)
        assert converted.key_groups == converted.value_groups == (0, 1, 2, 3)
        for causal in (False, True):
            want = convert.attention_output(original, x, causal=causal)
            torch.testing.assert_close(converted(x, causal=causal), want, atol=1e-12, rtol=1e-12)
            assert convert.conversion_error(original, converted, x, causal=causal) < 1e-12
    assert (converted.q_proj.bias is not None) == bias


def test_to_dha_interface_and_shapes():
    _, mha, _ = mha_modules(dim=48, heads=8)
    x = rand(3, 10, 48)
    for kv, (gk, gv) in ((4, (4, 4)), (2, (2, 2)), ((4, 2), (4, 2))):
        for method in ("cluster", "mean"):
            m = convert.to_dha(mha, kv, method=method)
            assert isinstance(m, DecoupledHeadAttention) and (m.key_heads, m.value_heads) == (gk, gv)
            assert m.k_proj.weight.shape == (gk * 6, 48) and m.v_proj.weight.shape == (gv * 6, 48)
            assert m.kv_cache_width * 16 == mha.kv_cache_width * (gk + gv)
            assert m(x, causal=True).shape == x.shape and m(x, rand(3, 4, 48)).shape == x.shape
            torch.testing.assert_close(m.q_proj.weight, mha.q_proj.weight)  # queries and output untouched
            torch.testing.assert_close(m.o_proj.weight, mha.o_proj.weight)
    assert convert.to_dha(mha, 2, method="mean").key_groups == (0, 0, 0, 0, 1, 1, 1, 1)  # GQA: consecutive


def test_identical_heads_fuse_exactly_wherever_they_sit():
    """Spec hook: heads identical within a group convert exactly. Consecutive duplicates: both
    methods; scattered duplicates: only clustering finds them."""
    x = rand(2, 7, 32)
    for layout, exact in (((0, 0, 1, 1), ("cluster", "mean")), ((0, 1, 1, 0), ("cluster",))):
        _, _, mha = mha_modules(dim=32, heads=4)
        with torch.no_grad():
            for proj in (mha.k_proj, mha.v_proj):
                w, b = proj.weight.view(4, 8, 32).clone(), proj.bias.view(4, 8).clone()
                proj.weight.copy_(w[list(layout)].flatten(0, 1))
                proj.bias.copy_(b[list(layout)].flatten())
        for method in ("cluster", "mean"):
            err = convert.conversion_error(mha, convert.to_dha(mha, 2, method=method), x, causal=True)
            assert (err < 1e-12) == (method in exact), (layout, method, err)


def test_clustering_beats_mean_pooling_on_heads_with_shared_structure():
    """Key and value heads are noisy copies of 4 prototypes scattered over 8 heads: clustering finds
    the planted groups and its error is a fraction of mean pooling's at 2x; it still wins at 4x."""
    mha, key_labels, value_labels = prototype_mha(dim=32, heads=8, prototypes=4, noise=0.1, seed=3)
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    same_partition = lambda a, b: len(set(zip(a, b))) == len(set(a)) == len(set(b))
    errors = {}
    for r in (2, 4):
        for method in ("cluster", "mean"):
            m = convert.to_dha(mha, 8 // r, method=method)
            errors[method, r] = convert.conversion_error(mha, m, x, causal=True)
            if (method, r) == ("cluster", 2):
                assert same_partition(m.key_groups, key_labels) and same_partition(m.value_groups, value_labels)
    assert errors["cluster", 2] < 0.25 * errors["mean", 2], errors
    assert errors["cluster", 4] <= errors["mean", 4], errors


def test_calibrated_similarity_clusters_by_outputs():
    """With calibration inputs confined to a subspace, heads that differ only outside it are alike."""
    torch.manual_seed(0)
    mha = DecoupledHeadAttention(8, 4, head_dim=2).double()
    with torch.no_grad():
        w = torch.zeros(4, 2, 8, dtype=torch.float64)
        w[:, :, :4] = torch.tensor([1.0, 1.0, 5.0, 5.0]).view(4, 1, 1)  # seen by the calibration data
        w[:, :, 4:] = torch.tensor([0.0, 9.0, 9.0, 0.0]).view(4, 1, 1)  # unseen: calibration ignores it
        mha.k_proj.weight.copy_(w.flatten(0, 1))
    calibration = torch.cat([rand(64, 4), torch.zeros(64, 4, dtype=torch.float64)], dim=1)
    assert convert.to_dha(mha, 2, calibration=calibration).key_groups == (0, 0, 1, 1)
    assert convert.to_dha(mha, 2).key_groups == (0, 1, 1, 0)  # by weights, the unseen part dominates


def test_ward_clustering():
    pts = torch.tensor([[0.0], [5.0], [0.1], [10.0], [5.1]])
    assert convert.cluster_heads(pts, 3) == (0, 1, 0, 2, 1)
    assert convert.cluster_heads(pts, 5) == (0, 1, 2, 3, 4)
    assert convert.cluster_heads(pts, 1) == (0,) * 5


@pytest.mark.parametrize(
    ("module", "kwargs", "match"),
    [
        (DecoupledHeadAttention(16, 4), {"kv_heads": 0}, "kv_heads must be an int or a \\(key_heads, value_heads\\)"),
        (DecoupledHeadAttention(16, 4), {"kv_heads": 5}, "pair of ints in \\[1, 4\\]"),
        (DecoupledHeadAttention(16, 4), {"kv_heads": 3, "method": "mean"}, "method='mean' needs kv_heads to divide"),
        (DecoupledHeadAttention(16, 4), {"kv_heads": 2, "method": "kmeans"}, "method must be one of cluster, mean"),
        (DecoupledHeadAttention(16, 4), {"kv_heads": 2, "calibration": torch.randn(5, 8)}, "calibration must be"),
        (PlainMHA(16, 4, kv_heads=2), {"kv_heads": 2}, "attn_module must be MHA over one width"),
        (DecoupledHeadAttention(16, 4, key_groups=(1, 0, 2, 3)), {"kv_heads": 2}, "key_groups is not the identity"),
        (torch.nn.Linear(4, 4), {"kv_heads": 2}, "attn_module must be nn.MultiheadAttention or have `heads`"),
        (torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8), {"kv_heads": 2}, "kdim/vdim"),
    ],
)
def test_bad_conversions_raise(module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert.to_dha(module, **kwargs)

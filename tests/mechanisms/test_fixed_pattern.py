"""fixed_pattern: every kind against its oracle (chunked, forward and gradients), the definitions
themselves, empty rows, bounded memory, bad options, and the learned-pattern module."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms import fixed_pattern
from attnlab.testing import LargestTensor, cases, compare_to_reference

MECH = attnlab.get("fixed_pattern")


def qkv(B=2, H=4, Hkv=2, T=11, S=11, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64),
    )


def pattern(H, T, S, seed=0):
    return torch.rand(H, T, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def small_chunks(monkeypatch):
    """Few rows per chunk, so tiny inputs cross many chunk boundaries."""
    monkeypatch.setattr(fixed_pattern, "CHUNK_ELEMENTS", 2048)


KIND_OPTIONS = {
    "uniform": lambda H, T, S: {"kind": "fixed"},
    "weights_ts": lambda H, T, S: {"kind": "fixed", "weights": pattern(1, T, S)[0]},
    "weights_hts": lambda H, T, S: {"kind": "fixed", "weights": pattern(H, T, S)},
    "sigmoid": lambda H, T, S: {"kind": "sigmoid"},
    "sigmoid_bias": lambda H, T, S: {"kind": "sigmoid", "bias": 0.5},
}  # kind="relu" is the registry example: tests/contract/test_contract.py runs it over this grid (and bf16)
GRID = [(name, c) for name in KIND_OPTIONS for c in cases(MECH, dtypes=(torch.float32, torch.float64))]


@pytest.mark.parametrize(("name", "case"), GRID, ids=[f"{n}-{c}" for n, c in GRID])
def test_every_kind_matches_the_oracle_across_chunks(name, case, small_chunks):
    q, k, v = case.inputs(seed=3)
    opts = KIND_OPTIONS[name](case.H, case.T, case.S)
    assert not compare_to_reference("fixed_pattern", q, k, v, impl="chunked", causal=case.causal, **opts)


def test_bf16_runs_in_fp32_and_matches():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(T=13, S=29))
    for kind in KINDS_ALL:
        assert not compare_to_reference("fixed_pattern", q, k, v, causal=True, kind=kind)


KINDS_ALL = fixed_pattern.KINDS


@pytest.mark.parametrize("kind", KINDS_ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_oracle_gradcheck(kind, causal):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Hkv=1, T=4, S=5, D=3, Dv=2))
    if kind == "fixed":
        w = pattern(2, 4, 5).requires_grad_()
        fn = lambda q, k, v, w: MECH.oracle(q, k, v, causal=causal, kind=kind, weights=w).out  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, w))
    else:
        bias = -math.log(5) if kind == "sigmoid" else None
        fn = lambda q, k, v: MECH.oracle(q, k, v, causal=causal, kind=kind, bias=bias).out  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_learned_weights_get_the_same_gradient_from_both_paths(small_chunks):
    q, k, v = qkv(T=9, S=14)
    w1, w2 = (pattern(4, 9, 14).requires_grad_() for _ in range(2))
    up = torch.randn(2, 4, 9, 6, dtype=torch.float64)
    for impl, w in (("chunked", w1), ("reference", w2)):
        out = attnlab.attention(q, k, v, "fixed_pattern", causal=True, impl=impl, kind="fixed", weights=w)
        out.backward(up)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-12, rtol=1e-12)
    assert w1.grad.abs().sum() > 0


def test_uniform_is_the_mean_and_the_causal_prefix_mean():
    q, k, v = qkv(T=6, S=10)
    full = attnlab.attention(q, k, v, "fixed_pattern")
    torch.testing.assert_close(full, v.mean(2, keepdim=True).repeat_interleave(2, 1).expand_as(full))
    causal = attnlab.attention(q, k, v, "fixed_pattern", causal=True)
    for i in range(6):  # row i sits at key position i + 4
        want = v[:, :, : i + 5].mean(2).repeat_interleave(2, 1)
        torch.testing.assert_close(causal[:, :, i], want)
    ones = torch.ones(6, 10, dtype=torch.float64)
    torch.testing.assert_close(causal, attnlab.attention(q, k, v, "fixed_pattern", causal=True, weights=ones * 3))


def test_fixed_pattern_ignores_q_and_k():
    q, k, v = qkv()
    w = pattern(4, 11, 11)
    a = attnlab.attention(q, k, v, "fixed_pattern", causal=True, weights=w)
    b = attnlab.attention(torch.randn_like(q), torch.randn_like(k), v, "fixed_pattern", causal=True, weights=w)
    assert torch.equal(a, b)


def test_sigmoid_is_unnormalized_and_relu_rows_sum_to_one():
    q, k, v = qkv(T=7, S=9)
    scale = 8**-0.5
    z = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(2, 1)) * scale
    p = MECH.weights(q, k, v, kind="sigmoid")
    torch.testing.assert_close(p, torch.sigmoid(z - math.log(9)))  # default bias -log(S)
    assert (p.sum(-1) - 1).abs().max() > 0.1  # not a distribution
    p = MECH.weights(q, k, v, causal=True, kind="relu")
    sums = p.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-12) | (sums == 0))
    torch.testing.assert_close(p[..., -1, :], z.relu()[..., -1, :] / z.relu()[..., -1, :].sum(-1, keepdim=True))


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_rows_without_keys_are_zero_with_finite_gradients(kind, small_chunks):
    q, k, v = (t.requires_grad_() for t in qkv(T=12, S=5))  # causal cross: rows 0..6 see no key
    out = attnlab.attention(q, k, v, "fixed_pattern", causal=True, kind=kind)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v) if t.grad is not None)


def test_relu_row_with_no_positive_score_is_zero_not_nan(small_chunks):
    q, k, v = qkv(H=2, Hkv=2, T=3, S=6)
    k = k.abs()
    q = -q.abs()  # every score <= 0: the row sum is 0
    q.requires_grad_()
    for impl in ("chunked", "reference"):
        out = attnlab.attention(q, k, v, "fixed_pattern", kind="relu", impl=impl)
        assert torch.equal(out, torch.zeros_like(out))
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(g).all()


def test_chunked_path_never_holds_a_full_score_map(monkeypatch):
    B, H, T = 1, 4, 128
    q, k, v = (t.float().requires_grad_() for t in qkv(B=B, H=H, Hkv=2, T=T, S=T, D=8, Dv=8))
    monkeypatch.setattr(fixed_pattern, "CHUNK_ELEMENTS", B * H * T * 16)  # 16 rows a chunk
    for kind in ("sigmoid", "relu"):
        with LargestTensor() as probe:
            out = attnlab.attention(q, k, v, "fixed_pattern", causal=True, kind=kind)
            out.sum().backward()
        assert probe.numel <= B * H * T * 16, (kind, probe.numel)
    with LargestTensor() as probe:  # the uniform pattern needs no scores at all
        attnlab.attention(q, k, v, "fixed_pattern", causal=True).sum().backward()
    assert probe.numel <= B * H * T * 8


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"kind": "softmax"}, "kind must be one of 'fixed', 'sigmoid', 'relu'"),
        ({"kind": "sigmoid", "weights": torch.ones(11, 11)}, "weights applies only to kind='fixed'"),
        ({"weights": torch.ones(11, 12)}, "weights must be \\[T, S\\] or \\[H, T, S\\] with T=11, S=11"),
        ({"weights": torch.ones(2, 2, 11, 11)}, "weights must be a float tensor"),
        ({"weights": torch.ones(11, 11, dtype=torch.long)}, "weights must be a float tensor"),
        ({"weights": -torch.ones(11, 11)}, "finite and non-negative"),
        ({"weights": torch.ones(3, 11, 11)}, "weights must have 1 or H=4 heads"),
        ({"kind": "relu", "bias": 1.0}, "bias applies only to kind='sigmoid'"),
        ({"kind": "sigmoid", "bias": float("nan")}, "bias must be a finite number"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = qkv()
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match=match):
            attnlab.attention(q, k, v, "fixed_pattern", impl=impl, **opts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(
        st.integers(1, 2),
        st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
        st.integers(1, 30),
        st.integers(1, 30),
        st.integers(1, 6),
        st.integers(1, 6),
    ),
    kind=st.sampled_from(["uniform", "weights", "sigmoid", "relu"]),
    causal=st.booleans(),
    chunk=st.sampled_from([1, 7, 64, 1 << 22]),
    seed=st.integers(0, 10**6),
)
def test_fuzz_against_oracle(shape, kind, causal, chunk, seed):
    B, (H, Hkv), T, S, D, Dv = shape
    q, k, v = qkv(B, H, Hkv, T, S, D, Dv, seed)
    opts = {"uniform": {}, "weights": {"weights": pattern(H, T, S, seed)}}.get(kind, {"kind": kind})
    old = fixed_pattern.CHUNK_ELEMENTS
    fixed_pattern.CHUNK_ELEMENTS = chunk
    try:
        assert not compare_to_reference("fixed_pattern", q, k, v, causal=causal, **opts)
    finally:
        fixed_pattern.CHUNK_ELEMENTS = old


# -- the learned-pattern module ------------------------------------------------------------------------


def test_module_starts_uniform_and_follows_its_logits():
    from attnlab.nn import FixedPatternAttention

    torch.manual_seed(0)
    m = FixedPatternAttention(12, 3, max_len=10).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    v = m.v(x).view(2, 7, 3, 4).transpose(1, 2)
    prefix_mean = v.cumsum(2) / torch.arange(1, 8, dtype=torch.float64).view(7, 1)
    torch.testing.assert_close(m(x), m.o(prefix_mean.transpose(1, 2).flatten(-2)))
    with torch.no_grad():
        m.logits.normal_()
    logits = m.logits[:, :7, :7].masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(logits, -1) @ v
    torch.testing.assert_close(m(x), m.o(want.transpose(1, 2).flatten(-2)))
    m(x).sum().backward()
    grad = m.logits.grad
    assert grad[:, :7, :7].tril().abs().sum() > 0
    assert grad[:, :7, :7].triu(1).abs().max() == 0 and grad[:, 7:].abs().max() == 0


def test_module_bad_options_and_lengths():
    from attnlab.nn import FixedPatternAttention

    with pytest.raises(ValueError, match="max_len must be a positive int"):
        FixedPatternAttention(12, 3, max_len=0)
    with pytest.raises(ValueError, match="dim must be a multiple of heads"):
        FixedPatternAttention(13, 3, max_len=8)
    m = FixedPatternAttention(12, 3, max_len=8, causal=False)
    with pytest.raises(ValueError, match="sequence length must be in \\[1, max_len=8\\]"):
        m(torch.randn(1, 9, 12))
    with pytest.raises(ValueError, match="x must be \\[B, L, 12\\]"):
        m(torch.randn(1, 4, 10))
    p = m.pattern(5)
    torch.testing.assert_close(p, torch.full((3, 5, 5), 0.2))  # non-causal: uniform over all keys

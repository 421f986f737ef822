"""Linear and lightning attention: parallel == a naive loop, chunked == parallel, recurrent step by
step == parallel, split-with-state == the full sequence; normalization edge cases; bad options."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.kernels import linear_chunks
from attnlab.mechanisms import lightning, linear
from attnlab.testing import LargestTensor

MAPS = ("elu+1", "relu", "identity")
# (mechanism, options): plain linear per feature map, and lightning with default and explicit decays
VARIANTS = [("linear", {"feature_map": m}) for m in MAPS] + [
    ("lightning", {}),
    ("lightning", {"decay": 0.5}),
]
IDS = [f"{n}-{o.get('feature_map', o.get('decay', 'alibi'))}" for n, o in VARIANTS]
SHAPES = [(37, 37), (13, 37), (40, 23), (1, 9), (9, 1), (16, 16)]  # (T, S): self, cross both ways, edges


def qkv(T, S, B=1, H=4, Hkv=2, D=6, Dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, Dv)


def decays(name, opts, H):
    """[H] float64 decays, or None for plain linear."""
    return lightning.decay_tensor(lightning.check_decay(opts.get("decay")), H) if name == "lightning" else None


def naive(q, k, v, causal, feature_map, decay, scale=None):
    """A loop over (t, j) written from the module docstring's rule, independent of linear.py."""
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    phi = {"elu+1": lambda x: F.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}[feature_map]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                p = t + S - T
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                for j in range(S):
                    if causal and j > p:
                        continue
                    w = scale * phi(q[b, h, t]) @ phi(k[b, h // G, j])
                    if decay is not None:
                        w = w * decay[h] ** abs(p - j)
                    num, den = num + w * v[b, h // G, j], den + w
                out[b, h, t] = num / max(float(den), linear.EPS) if feature_map != "identity" else num
    return out


def run(name, opts, q, k, v, causal, impl="auto"):
    return attnlab.attention(q, k, v, name, causal=causal, impl=impl, **opts)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parallel_form_matches_a_naive_loop(name, opts, causal):
    for T, S in ((6, 6), (3, 7), (7, 3)):
        q, k, v = qkv(T, S)
        fmap = opts.get("feature_map", "identity")
        want = naive(q, k, v, causal, fmap, decays(name, opts, 4))
        torch.testing.assert_close(run(name, opts, q, k, v, causal, impl="reference"), want, atol=1e-12, rtol=1e-12)


@contextlib.contextmanager
def small_blocks(chunks=2, tokens=16):
    """A few chunks (tokens) per batched block, so tiny inputs cross block boundaries too."""
    with mock.patch.multiple(linear_chunks, BLOCK_CHUNKS=chunks, BLOCK_TOKENS=tokens):
        yield


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("small", [True, False], ids=["small-blocks", "default-blocks"])
def test_chunked_equals_parallel_forward_and_gradients_fp64(name, opts, causal, small):
    with small_blocks() if small else contextlib.nullcontext():
        _chunked_equals_parallel(name, opts, causal)


def _chunked_equals_parallel(name, opts, causal):
    for i, (T, S) in enumerate(SHAPES):
        for chunk in (1, 8) if T < 20 else (3, 64):  # several chunks + remainder, and one partial chunk
            q, k, v = (x.requires_grad_() for x in qkv(T, S, seed=i))
            got = run(name, {**opts, "chunk_size": chunk}, q, k, v, causal)
            want = run(name, opts, q, k, v, causal, impl="reference")
            torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)
            up = torch.randn_like(got)
            for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def recurrent(name, opts, q, k, v, state=None, **kw):
    if name == "lightning":
        return lightning.recurrent(q, k, v, state, decay=opts.get("decay"), **kw)
    return linear.recurrent(q, k, v, state, feature_map=opts["feature_map"], **kw)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
def test_recurrent_step_by_step_equals_parallel(name, opts):
    q, k, v = qkv(19, 19)
    want = run(name, opts, q, k, v, True, impl="reference")
    state, outs = None, []
    for t in range(19):
        out, state = recurrent(name, opts, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-12, rtol=1e-12)
    assert state.kv.shape == (1, 4, 6, 5) and state.kv.dtype == torch.float64
    assert (state.z is None) == (opts.get("feature_map", "identity") == "identity")


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("split", [1, 8, 13, 24])
def test_split_with_state_equals_the_full_sequence(name, opts, split):
    q, k, v = qkv(25, 25, seed=split)
    with small_blocks():
        full = run(name, {**opts, "chunk_size": 8}, q, k, v, True)
    a, state = recurrent(name, opts, q[:, :, :split], k[:, :, :split], v[:, :, :split], chunk_size=8)
    b, state_b = recurrent(name, opts, q[:, :, split:], k[:, :, split:], v[:, :, split:], state, chunk_size=8)
    torch.testing.assert_close(torch.cat([a, b], dim=2), full, atol=1e-12, rtol=1e-12)
    _, whole = recurrent(name, opts, q, k, v, chunk_size=5)  # the final state does not depend on the split
    torch.testing.assert_close(state_b.kv, whole.kv, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_state_stays_fp32_for_low_precision_inputs(dtype):
    q, k, v = qkv(10, 10, dtype=dtype)
    out, state = linear.recurrent(q, k, v)
    assert out.dtype == dtype and state.kv.dtype == torch.float32 and state.z.dtype == torch.float32
    ref = attnlab.attention(q, k, v, "linear", causal=True, impl="reference")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parallel_form_gradcheck(name, opts, causal):
    q, k, v = (x.requires_grad_() for x in qkv(5, 4, H=2, Hkv=1, D=3, Dv=2))
    ref = attnlab.get(name).oracle
    assert torch.autograd.gradcheck(lambda q, k, v: ref(q, k, v, causal=causal, **opts).out, (q, k, v))


def test_rows_with_no_key_and_zero_denominators_give_zero_not_nan():
    q, k, v = (x.requires_grad_() for x in qkv(9, 4))
    for name, opts in VARIANTS:
        out = run(name, opts, q, k, v, True)
        assert out[:, :, :5].abs().max() == 0  # T - S = 5 rows sit before the first key
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
        q.grad = k.grad = v.grad = None
    # relu features that miss every key (q < 0): den == 0 exactly, output 0, finite gradients
    q, k, v = qkv(6, 6)
    q = (-q.abs()).requires_grad_()
    for impl in ("auto", "reference"):
        out = attnlab.attention(q, k, v, "linear", impl=impl, feature_map="relu")
        assert out.abs().max() == 0
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(g).all()


def test_tiny_denominators_stay_bounded_and_agree():
    q, k, v = qkv(20, 20)
    q, k = q * 1e-4, k * 1e-4  # relu den ~ 1e-9 < EPS: the clamp shrinks rows instead of exploding
    got = attnlab.attention(q, k, v, "linear", causal=True, feature_map="relu", chunk_size=4)
    want = attnlab.attention(q, k, v, "linear", causal=True, feature_map="relu", impl="reference")
    assert torch.isfinite(got).all() and got.abs().max() <= v.abs().max()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_non_causal_every_query_sees_every_key():
    q, k, v = qkv(11, 17)
    perm = torch.randperm(17)
    for fmap in MAPS:  # no decay: a set function of the keys, so permuting them changes nothing
        a = attnlab.attention(q, k, v, "linear", feature_map=fmap, chunk_size=4)
        b = attnlab.attention(q, k[:, :, perm], v[:, :, perm], "linear", feature_map=fmap, chunk_size=4)
        torch.testing.assert_close(a, b)
    # with a decay, each key contributes at gamma**|p_t - j|: a key placed anywhere moves every row
    out = attnlab.attention(q, k, v, "lightning", decay=0.7, chunk_size=4)
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    moved = attnlab.attention(q, k, v2, "lightning", decay=0.7, chunk_size=4) - out
    assert (moved.abs().amax(dim=(0, 1, 3)) > 0).all()


def test_chunked_memory_is_linear_in_length():
    sizes = {}
    for T in (512, 1024):
        q, k, v = qkv(T, T, H=2, Hkv=2, D=8, Dv=8, dtype=torch.float32)
        for name in ("linear", "lightning"):
            with LargestTensor() as probe, torch.no_grad():
                attnlab.attention(q, k, v, name, causal=True, chunk_size=16)
            sizes[name, T] = probe.numel
            assert probe.numel < T * T  # never a T x S tensor (B * H * T * T would be 2 T^2)
    for name in ("linear", "lightning"):
        assert sizes[name, 1024] <= 2 * sizes[name, 512]


def test_one_decode_step_touches_only_the_state():
    """A step's work is independent of the prefix length: the same largest tensor after 16 or 2048."""
    largest = []
    for T in (16, 2048):
        q, k, v = qkv(T + 1, T + 1, dtype=torch.float32)
        for name, opts in (("linear", {"feature_map": "elu+1"}), ("lightning", {})):
            _, state = recurrent(name, opts, q[:, :, :T], k[:, :, :T], v[:, :, :T])
            with LargestTensor() as probe, torch.no_grad():
                recurrent(name, opts, q[:, :, T:], k[:, :, T:], v[:, :, T:], state)
            largest.append(probe.numel)
    assert largest[:2] == largest[2:]


@settings(max_examples=25, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    causal=st.booleans(),
    T=st.integers(1, 20),
    S=st.integers(1, 20),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    D=st.integers(1, 5),
    Dv=st.integers(1, 5),
    chunk=st.integers(1, 9),
    block=st.sampled_from([(1, 1), (3, 8), (128, 16384)]),
)
def test_fuzz_chunked_equals_parallel(variant, causal, T, S, heads, D, Dv, chunk, block):
    name, opts = variant
    q, k, v = qkv(T, S, B=2, H=heads[0], Hkv=heads[1], D=D, Dv=Dv)
    with small_blocks(*block):
        got = run(name, {**opts, "chunk_size": chunk}, q, k, v, causal)
    want = run(name, opts, q, k, v, causal, impl="reference")
    torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("linear", {"feature_map": "softmax"}, "feature_map must be one of 'elu\\+1', 'relu', 'identity'"),
        ("linear", {"feature_map": None}, "feature_map must be one of"),
        ("linear", {"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_options(name, opts, match):
    q, k, v = qkv(8, 8)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, name, causal=True, **opts)


def test_bad_recurrent_calls():
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="same new tokens"):
        linear.recurrent(q, k[:, :, :3], v[:, :, :3])
    _, state = linear.recurrent(q, k, v)
    with pytest.raises(ValueError, match="needs z=None"):
        linear.recurrent(q, k, v, state, feature_map="identity")
    with pytest.raises(ValueError, match="state.kv must be"):
        linear.recurrent(q[:, :2], k[:, :1], v[:, :1], state)
    with pytest.raises(TypeError, match="state must be a LinearState"):
        linear.recurrent(q, k, v, (state.kv, state.z))
    with pytest.raises(ValueError, match="decay must lie in"):
        lightning.recurrent(q, k, v, decay=2.0)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear.recurrent(q, k, v, feature_map="exp")

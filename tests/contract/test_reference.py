"""The dense oracle: its own correctness, fp64 gradchecks, mask forms, and empty rows."""

import math

import pytest
import torch

import attnlab
from attnlab import reference, registry


def naive(q, k, v, allowed, scale):
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    g = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = [j for j in range(k.shape[2]) if allowed[b, h, i, j]]
                if not keys:
                    continue
                s = torch.stack([scale * q[b, h, i] @ k[b, h // g, j] for j in keys])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(pj * v[b, h // g, j] for pj, j in zip(p, keys))
    return out


def test_oracle_matches_loops_with_gqa_mask_forms_and_empty_rows():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 3, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 2, dtype=torch.float64)
    full = torch.rand(2, 4, 5, 6) > 0.4
    full[0, 1, 2] = False  # a row with no key
    for m in (full, full[0], full[0, 0]):
        allowed = m.expand(2, 4, 5, 6)
        ref = reference.attention(q, k, v, m)
        torch.testing.assert_close(ref.out, naive(q, k, v, allowed, 3**-0.5), atol=1e-12, rtol=1e-12)
        empty = ~allowed.any(-1)
        assert torch.isneginf(ref.lse[empty]).all() and torch.isfinite(ref.lse[~empty]).all()
        assert (ref.weights[~allowed] == 0).all()
        torch.testing.assert_close(ref.weights.sum(-1), (~empty).double())


def test_oracle_dtypes_and_causal_alignment():
    q = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 5, 4, dtype=torch.bfloat16)
    ref = reference.attention(q, k, k, causal=True)
    assert ref.out.dtype == torch.bfloat16 and ref.weights.dtype == torch.float32
    # bottom-right: the last query sees every key, the first sees S - T + 1 of them
    assert (ref.weights[0, 0] > 0).sum(-1).tolist() == [3, 4, 5]
    assert reference.attention(q.double(), k.double(), k.double()).lse.dtype == torch.float64


@pytest.mark.parametrize("name", attnlab.names())
def test_reference_gradcheck(name):
    mech = attnlab.get(name)
    S = 12
    patterns = [(T, c) for T in (12, 7) for c in (False, True) if registry.pattern(T, S, c) in mech.patterns]
    for T, causal in patterns:
        q = torch.randn(1, 2, T, 4, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, 1, S, 4, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, 1, S, 3, dtype=torch.float64, requires_grad=True)
        opts = mech.example(S)

        def f(q, k, v, causal=causal, opts=opts):
            return attnlab.attention(q, k, v, name, causal=causal, impl="reference", **opts)

        assert torch.autograd.gradcheck(f, (q, k, v))


def test_fully_masked_rows_are_zero_with_finite_gradients_on_every_path():
    # causal cross-attention with T > S: the first T - S rows have no key at all
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    for name in ("dense", "sliding_window", "document"):
        for impl in ("reference", *attnlab.get(name).impls):
            opts = attnlab.get(name).example(5)
            try:
                out = attnlab.attention(q, k, v, name, causal=True, impl=impl, **opts)
            except ValueError:
                continue
            assert (out[:, :, :4] == 0).all(), (name, impl)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads), (name, impl)
            assert (grads[0][:, :, :4] == 0).all()


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = torch.randn(3, 1, 1, 4, 16, dtype=torch.float64)
    a = attnlab.attention(q, k, v)
    b = attnlab.attention(q, k, v, scale=1 / math.sqrt(16))
    c = attnlab.attention(q, k, v, scale=1.0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)

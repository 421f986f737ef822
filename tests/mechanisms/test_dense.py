"""Dense softmax attention (Vaswani et al.): the bottom-right causal mask written out by loops,
every impl (SDPA, the block-sparse executor) against the oracle with gradients, the pattern SDPA
cannot run, and no options."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def causal_mask(T, S):
    """The definition: query row i sits at key position i + S - T and sees keys at or before it."""
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            m[i, j] = j <= i + S - T
    return m


SHAPES = [(6, 6), (3, 8), (8, 3), (1, 5), (5, 1)]


@pytest.mark.parametrize(("T", "S"), SHAPES)
def test_mask_is_the_definition(T, S):
    assert _2d(attnlab.mask("dense", T, S)).all() and _2d(attnlab.mask("dense", T, S)).shape == (T, S)
    assert torch.equal(_2d(attnlab.mask("dense", T, S, causal=True)), causal_mask(T, S))


@pytest.mark.parametrize("impl", list(attnlab.get("dense").impls))
@pytest.mark.parametrize(("T", "S"), SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_impl_matches_the_oracle_forward_and_gradients(impl, T, S, causal):
    q = torch.randn(2, 4, T, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, S, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, S, 5, dtype=torch.float64, requires_grad=True)  # Dv != D: SDPA pads
    if impl == "sdpa" and causal and T != S:  # the one pattern SDPA aligns differently: refused, not wrong
        with pytest.raises(ValueError, match="impl 'sdpa' of dense cannot run this call"):
            attnlab.attention(q, k, v, causal=causal, impl=impl)
        return
    with attnlab.kernels.block_size(4, 4):  # several blocks for the executor
        got = attnlab.attention_lse(q, k, v, causal=causal, impl=impl)
    want = attnlab.attention_lse(q, k, v, causal=causal, impl="reference")
    torch.testing.assert_close(got.out, want.out)
    torch.testing.assert_close(got.lse, want.lse)
    up = torch.randn_like(got.out)
    for a, b in zip(torch.autograd.grad(got.out, (q, k, v), up), torch.autograd.grad(want.out, (q, k, v), up)):
        torch.testing.assert_close(a, b)


def test_auto_runs_causal_cross_attention_bottom_right():
    # SDPA would align this top-left; auto must fall back to the executor and keep bottom-right
    q, k, v = torch.randn(3, 1, 2, 4, 4, dtype=torch.float64)
    q = q[:, :, :2]
    out = attnlab.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, attnlab.attention(q, k, v, causal=True, impl="reference"))
    last = attnlab.attention(q[:, :, 1:], k, v)  # the last query row sits at the last key: it sees all
    torch.testing.assert_close(out[:, :, 1:], last)


def test_no_keys_gives_zero_rows():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)
    for impl in ("auto", "reference"):
        assert torch.equal(attnlab.attention(q, k, k, impl=impl), torch.zeros(1, 2, 3, 4))


def test_dense_takes_no_options():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"dense got unknown option\(s\) \['window'\]; it accepts: none"):
        attnlab.attention(q, k, v, "dense", window=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['causal_offset'\]"):
        attnlab.mask("dense", 4, 4, causal_offset=1)

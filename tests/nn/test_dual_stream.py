"""DualStreamBlock: the three head-mixing modes against explicit matrices, their nesting, head
isolation, the two streams, and attention amplification."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.nn import DualStreamBlock

H, D = 3, 4  # heads, channels per head
DIM = H * D


def streams(B=2, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, DIM, generator=g, dtype=torch.float64), torch.randn(
        B, L, DIM, generator=g, dtype=torch.float64
    )


def block(mode, seed=0, **kw):
    torch.manual_seed(seed)
    return DualStreamBlock(DIM, H, mode, **kw).double()


def randomize_norm(b):
    with torch.no_grad():  # non-trivial affine CLN, so the tests see its per-head parameters
        b.attn_norm.weight.uniform_(0.5, 1.5)
        b.attn_norm.bias.normal_()


def test_independent_is_per_head_attention_with_block_diagonal_output():
    b = block("independent")
    randomize_norm(b)
    x_t, x_e = streams()
    s = x_t + x_e
    heads = []
    for h in range(H):  # each head alone, from its own channel block, with explicit math
        xh = s[..., h * D : (h + 1) * D]
        xh = (xh - xh.mean(-1, keepdim=True)) / torch.sqrt(xh.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xh = xh * b.attn_norm.weight[h] + b.attn_norm.bias[h]
        q, k, v = (xh @ m.blocks[h].T for m in (b.q, b.k, b.v))
        heads.append(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    w_o = torch.block_diag(*b.o.blocks)
    want_t = x_t + torch.cat(heads, -1) @ w_o.T
    got_t, got_e = b(x_t, x_e)
    torch.testing.assert_close(got_t, want_t)
    torch.testing.assert_close(got_e, x_e + b.ffn(b.ffn_norm(want_t + x_e)))  # FFN writes the context stream


def test_independent_heads_do_not_mix_but_kronecker_and_dense_do():
    x_t, x_e = streams()
    bumped = x_t.clone()
    bumped[..., :D] += torch.randn_like(bumped[..., :D])  # perturb head 0's channel block only
    for mode in ("independent", "kronecker", "dense"):
        b = block(mode)
        if mode == "kronecker":
            with torch.no_grad():
                for m in (b.q, b.k, b.v, b.o):
                    m.mix.normal_()
        delta = (b.attend(bumped, x_e) - b.attend(x_t, x_e))[..., D:]  # heads 1.. of the update
        assert (delta.abs().max() < 1e-12) == (mode == "independent"), mode


def test_kronecker_with_identity_mixing_is_independent():
    ind, kron = block("independent", seed=1), block("kronecker", seed=2)
    randomize_norm(ind)
    kron.load_state_dict({k: v for k, v in ind.state_dict().items()}, strict=False)
    for m in (kron.q, kron.k, kron.v, kron.o):
        assert torch.equal(m.mix, torch.eye(H, dtype=torch.float64))  # M starts at I
    x_t, x_e = streams()
    for a, b in zip(kron(x_t, x_e), ind(x_t, x_e)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        kron.v.mix.add_(0.3 * torch.randn(H, H, dtype=torch.float64))
    assert (kron(x_t, x_e)[0] - ind(x_t, x_e)[0]).abs().max() > 1e-3


def test_dense_holding_a_kronecker_structured_weight_is_kronecker():
    kron, dense = block("kronecker", seed=3), block("dense", seed=4)
    randomize_norm(kron)
    state = {k: v for k, v in kron.state_dict().items() if k.split(".")[0] not in ("q", "k", "v", "o")}
    dense.load_state_dict(state, strict=False)
    with torch.no_grad():
        for km, dm in zip((kron.q, kron.k, kron.v, kron.o), (dense.q, dense.k, dense.v, dense.o)):
            km.mix.normal_()
            dm.weight.copy_(torch.kron(km.mix, torch.eye(D, dtype=torch.float64)) @ torch.block_diag(*km.blocks))
    x_t, x_e = streams()
    for a, b in zip(dense(x_t, x_e), kron(x_t, x_e)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_parameter_counts_follow_the_hierarchy():
    def attn_params(b):
        return sum(p.numel() for m in (b.q, b.k, b.v, b.o) for p in m.parameters())

    counts = [attn_params(block(m)) for m in ("independent", "kronecker", "dense")]
    assert counts == [4 * H * D * D, 4 * (H * D * D + H * H), 4 * DIM * DIM]


def entropy(p):
    return -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1).mean().item()


def test_amplification_one_is_a_no_op_and_alpha_scales_the_logits():
    b = block("kronecker")
    x_t, x_e = streams()
    base = b(x_t, x_e)
    b.amplification = 1.0
    for got, want in zip(b(x_t, x_e), base):
        assert torch.equal(got, want)
    b.amplification = 3.0
    q, k, _ = b.qkv(x_t, x_e)
    logits = 3.0 * (q @ k.transpose(-1, -2)) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(b.attention_weights(x_t, x_e), torch.softmax(logits, -1))


def test_amplification_lowers_entropy_and_tends_to_argmax():
    b = block("dense", causal=False)
    x_t, x_e = streams(L=9)
    ents = []
    for alpha in (0.25, 1.0, 4.0, 16.0):
        b.amplification = alpha
        ents.append(entropy(b.attention_weights(x_t, x_e)))
    assert all(a > c for a, c in zip(ents, ents[1:])), ents
    b.amplification = 1.0
    hard = b.attention_weights(x_t, x_e).argmax(-1)
    b.amplification = 1e4
    p = b.attention_weights(x_t, x_e)
    assert torch.equal(p.argmax(-1), hard) and p.max(-1).values.min() > 0.99


def test_gradients_reach_every_parameter():
    b = block("kronecker")
    x_t, x_e = streams()
    sum(t.sum() for t in b(x_t, x_e)).backward()
    missing = [n for n, p in b.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_any_registered_mechanism_is_the_core():
    b = block("independent", mechanism="sliding_window", window=2)
    x_t, x_e = streams(L=10)
    p = b.attention_weights(x_t, x_e)  # window 2, causal: each query sees itself and one key back
    band = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-2)
    assert torch.equal(p > 0, band.expand_as(p))
    assert b(x_t, x_e)[0].shape == x_t.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_mixing": "block"}, "head_mixing must be one of 'independent', 'kronecker', 'dense'"),
        ({"amplification": 0.0}, "amplification must be a finite number > 0"),
        ({"amplification": float("inf")}, "amplification must be a finite number > 0"),
        ({"amplification": True}, "amplification must be a finite number > 0"),
        ({"dim": 13}, "dim must be a multiple of heads"),
        ({"mechanism": "nope"}, "unknown mechanism 'nope'"),
        ({"ffn_mult": 0}, "ffn_mult must be a positive int"),
        ({"causal": 1}, "causal must be a bool"),
    ],
)
def test_bad_options(kwargs, match):
    args = {"dim": DIM, "heads": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        DualStreamBlock(**args)


def test_bad_amplification_at_inference_and_bad_streams():
    b = block("dense")
    with pytest.raises(ValueError, match="amplification must be a finite number > 0"):
        b.amplification = -2.0
    x_t, x_e = streams()
    with pytest.raises(ValueError, match="x_t and x_e must both be"):
        b(x_t, x_e[:, :3])


@settings(max_examples=15, deadline=None)
@given(mode=st.sampled_from(["independent", "kronecker", "dense"]), L=st.integers(1, 12), seed=st.integers(0, 999))
def test_fuzz_kronecker_mixing_equals_its_explicit_matrix(mode, L, seed):
    b = block(mode, seed=seed)
    if mode == "kronecker":
        with torch.no_grad():
            b.q.mix.normal_()
    x = streams(B=1, L=L, seed=seed)[0]
    if mode == "dense":
        w = b.q.weight
    else:
        mix = b.q.mix if mode == "kronecker" else torch.eye(H, dtype=torch.float64)
        w = torch.kron(mix, torch.eye(D, dtype=torch.float64)) @ torch.block_diag(*b.q.blocks)
    torch.testing.assert_close(b.q(x), x @ w.T)

"""Lightning attention (linear attention with a fixed per-head decay, Lightning Attention-2 / SALA):
the decayed recurrence written out token by token, SALA's default ALiBi decays, the decay limits,
and bad options naming the option. The forms shared with ``linear`` (parallel == naive loop,
chunked == parallel, recurrent == parallel) are tested for both in test_linear.py."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms import lightning


def qkv(T, S, B=1, H=4, Hkv=2, D=6, Dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, Dv)


def recurrence(q, k, v, gamma):
    """Spec §7.2 token by token: S_p = gamma_h S_{p-1} + k_p^T v_p over key positions p, and query row
    t reads the state at its position p = t + S - T (rows before the first key read zero)."""
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            state, states = torch.zeros(D, v.shape[-1], dtype=torch.float64), []
            for p in range(S):
                state = gamma[h] * state + torch.outer(k[b, h // G, p], v[b, h // G, p])
                states.append(state)
            for t in range(T):
                if t + S - T >= 0:
                    out[b, h, t] = D**-0.5 * q[b, h, t] @ states[t + S - T]
    return out


def test_lightning_invariants():
    # gamma -> 1 is causal linear attention with identity features: tril(Q K^T) V / sqrt(D)
    q, k, v = qkv(12, 12, Hkv=4)
    almost = attnlab.attention(q, k, v, "lightning", causal=True, decay=1 - 1e-13)
    plain = ((q @ k.transpose(-1, -2)) * 6**-0.5).tril() @ v
    torch.testing.assert_close(almost, plain, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(attnlab.attention(q, k, v, "linear", causal=True, feature_map="identity"), plain)
    # a per-head decay acts per head: head h equals a single-head call with its own decay
    g = (0.3, 0.6, 0.8, 0.95)
    out = attnlab.attention(q, k, v, "lightning", causal=True, decay=torch.tensor(g, dtype=torch.float64))
    for h, gh in enumerate(g):
        one = attnlab.attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], "lightning", causal=True, decay=gh)
        torch.testing.assert_close(out[:, h : h + 1], one)
    # SALA's default: gamma_h = exp(-slope_h), ALiBi slopes incl. the non-power-of-two rule
    assert lightning.alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert lightning.alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert lightning.default_decay(2) == (math.exp(-(2**-4)), math.exp(-(2**-8)))


@pytest.mark.parametrize(("T", "S"), [(7, 7), (4, 9), (9, 4)], ids=["self", "cross-short-q", "cross-long-q"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_causal_calls_are_the_decayed_recurrence(T, S, impl):
    q, k, v = qkv(T, S, B=2, seed=T)
    gamma = (0.2, 0.5, 0.9, 0.99)  # one per query head; GQA pairs share a kv head, not a decay
    got = attnlab.attention(q, k, v, "lightning", causal=True, impl=impl, decay=gamma, chunk_size=3)
    torch.testing.assert_close(got, recurrence(q, k, v, gamma), atol=1e-12, rtol=1e-12)


def test_default_decay_is_exp_minus_the_alibi_slope_per_head():
    q, k, v = qkv(6, 6)
    gamma = [math.exp(-(2.0 ** (-8 * (h + 1) / 4))) for h in range(4)]  # ALiBi, H = 4 (a power of two)
    torch.testing.assert_close(
        attnlab.attention(q, k, v, "lightning", causal=True), recurrence(q, k, v, gamma), atol=1e-12, rtol=1e-12
    )


def test_a_vanishing_decay_keeps_only_the_current_token():
    q, k, v = qkv(8, 8, Hkv=4)
    out = attnlab.attention(q, k, v, "lightning", causal=True, decay=1e-30)
    own = 6**-0.5 * (q * k).sum(-1, keepdim=True) * v  # o_t = scale (q_t . k_t) v_t
    torch.testing.assert_close(out, own, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"chunk_size": -4}, "chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive int"),
        ({"decay": 1.0}, "decay must lie in \\(0, 1\\)"),
        ({"decay": 0.0}, "decay must lie in \\(0, 1\\)"),
        ({"decay": (0.5, 1.5, 0.5, 0.5)}, "decay must lie in \\(0, 1\\)"),
        ({"decay": float("nan")}, "decay must lie in \\(0, 1\\)"),
        ({"decay": (0.5, 0.5)}, "decay must have one value per query head \\(H=4\\)"),
        ({"decay": torch.full((2, 2), 0.5)}, "decay must be a float or a 1-D tensor of per-head decays"),
        ({"decay": "fast"}, "decay must be None, a float"),
        ({"feature_map": "relu"}, "unknown option"),
        ({"decay": (0.5, True, 0.5, 0.5)}, "decay must be a float or a sequence of per-head floats"),
        ({"decay": ()}, "decay must lie in \\(0, 1\\)"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = qkv(8, 8)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "lightning", causal=True, **opts)

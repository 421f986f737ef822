"""CARE: each branch against an independent computation, the block's split, memory and causality."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms import care
from attnlab.nn import CAREBlock
from attnlab.testing import LargestTensor


def conv_loop(x, weight, shape, causal):
    """Depthwise conv by explicit neighbour sums ('same' zero padding; causal: past only)."""
    B, N, C = x.shape
    out = torch.zeros_like(x)
    if shape is None:
        kk = weight.shape[-1]
        left = kk - 1 if causal else (kk - 1) // 2
        for n in range(N):
            for t in range(kk):
                src = n - left + t
                if 0 <= src < N:
                    out[:, n] += x[:, src] * weight[:, 0, t]
        return out
    Hh, Ww = shape
    kh, kw = weight.shape[-2:]
    for r in range(Hh):
        for c in range(Ww):
            for a in range(kh):
                for b in range(kw):
                    rr, cc = r - (kh - 1) // 2 + a, c - (kw - 1) // 2 + b
                    if 0 <= rr < Hh and 0 <= cc < Ww:
                        out[:, r * Ww + c] += x[:, rr * Ww + cc] * weight[:, 0, a, b]
    return out


@pytest.mark.parametrize(
    ("shape", "kernel", "causal"),
    [(None, (3,), False), (None, (4,), False), (None, (3,), True), ((4, 5), (3, 3), False), ((4, 5), (2, 3), False)],
)
def test_branches_match_independent_computations(shape, kernel, causal):
    B, N, H, d, Cc = 2, 20, 2, 4, 3
    q, k, v = torch.randn(3, B, H, N, d, dtype=torch.float64)
    x_local = torch.randn(B, N, Cc, dtype=torch.float64)
    w = torch.randn(Cc, 1, *kernel, dtype=torch.float64)
    glob, local = care.decoupled(q, k, v, x_local, w, shape=shape, causal=causal, chunk_size=8)
    ref = attnlab.attention(q, k, v, "linear", causal=causal, feature_map="elu+1", impl="reference")
    torch.testing.assert_close(glob, ref.transpose(1, 2).reshape(B, N, H * d))
    torch.testing.assert_close(local, conv_loop(x_local, w, shape, causal))


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 24), C=st.integers(1, 4), kk=st.integers(1, 5), causal=st.booleans())
def test_fuzz_1d_conv_branch(N, C, kk, causal):
    x = torch.randn(2, N, C, dtype=torch.float64)
    w = torch.randn(C, 1, kk, dtype=torch.float64)
    torch.testing.assert_close(care.depthwise_conv(x, w, causal=causal), conv_loop(x, w, None, causal))


def test_split_is_asymmetric_and_rounded_to_heads():
    assert care.split_channels(64, 4, 0.5) == (32, 32)
    assert care.split_channels(64, 4, 0.25) == (16, 48)
    assert care.split_channels(30, 4, 0.3) == (8, 22)  # 9 rounds to a multiple of 4


def test_block_wires_its_parts_and_memory():
    torch.manual_seed(0)
    blk = CAREBlock(16, heads=2, la_ratio=0.25, shape=(3, 4)).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out, mem = blk(x)
    # the same computation written out from the parts
    q, k, v = blk.qkv(x[..., :4]).view(2, 12, 3, 2, 2).permute(2, 0, 3, 1, 4)
    glob = attnlab.attention(q, k, v, "linear", feature_map="elu+1", impl="reference").transpose(1, 2).reshape(2, 12, 4)
    local = conv_loop(x[..., 4:], blk.conv_weight, (3, 4), False)
    fused = blk.remember(torch.cat([blk.mix(torch.cat([glob, local], -1)), torch.zeros(2, 12, 16)], -1))
    torch.testing.assert_close(mem, fused)
    torch.testing.assert_close(out, blk.proj(fused))
    # memory: None is zeros, and a block's memory changes the next block's output
    torch.testing.assert_close(blk(x, torch.zeros_like(x)).output, out)
    nxt = CAREBlock(16, heads=2, la_ratio=0.25, shape=(3, 4)).double()
    assert (nxt(out, mem).output - nxt(out).output).abs().max() > 1e-3


def test_block_gradcheck_and_every_parameter_learns():
    torch.manual_seed(0)
    blk = CAREBlock(6, heads=1, kernel_size=3).double()
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    m = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: blk(x, m).output, (x, m))
    blk(x, m).output.sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in blk.parameters())


def test_causal_block_never_reads_the_future():
    torch.manual_seed(0)
    blk = CAREBlock(8, heads=2, causal=True, chunk_size=4)
    x = torch.randn(1, 15, 8)
    y = x.clone()
    y[:, 9:] += torch.randn(1, 6, 8)
    torch.testing.assert_close(blk(x).output[:, :9], blk(y).output[:, :9])
    assert (blk(x).output[:, 9:] - blk(y).output[:, 9:]).abs().max() > 1e-3


def test_block_memory_is_linear_in_tokens():
    blk = CAREBlock(32, heads=2, shape=(32, 32))
    x = torch.randn(1, 1024, 32)
    with LargestTensor() as probe, torch.no_grad():
        blk(x)
    assert probe.numel <= 3 * 1024 * 32  # the qkv projection; never N x N (over a million)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"la_ratio": 0.0}, "la_ratio must be a float in \\(0, 1\\)"),
        ({"la_ratio": 1.0}, "la_ratio must be a float in \\(0, 1\\)"),
        ({"la_ratio": 0.05}, "leaves no channels for one branch"),
        ({"heads": 0}, "heads must be a positive int"),
        ({"kernel_size": 0}, "kernel_size must be a positive int"),
        ({"shape": (2, 4), "causal": True}, "bidirectional"),
    ],
)
def test_bad_block_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAREBlock(16, **{"heads": 2, **kwargs})


def test_bad_block_inputs():
    blk = CAREBlock(8, heads=2, shape=(2, 3))
    with pytest.raises(ValueError, match="x must be \\[B, N, dim=8\\]"):
        blk(torch.randn(1, 6, 7))
    with pytest.raises(ValueError, match="shape must be \\(H, W\\) with H \\* W = N = 5"):
        blk(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="memory must have x's shape"):
        blk(torch.randn(1, 6, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="conv weight must be"):
        care.depthwise_conv(torch.randn(1, 6, 4), torch.randn(3, 1, 3))
    q = torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="x_local must be \\[B, N, C\\]"):
        care.decoupled(q, q, q, torch.randn(1, 5, 2), torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="1-D sequence"):
        care.depthwise_conv(torch.randn(1, 6, 2), torch.randn(2, 1, 3, 3))


def test_conv_matches_torch_same_padding_for_odd_kernels():
    x = torch.randn(2, 12, 3)
    w = torch.randn(3, 1, 3, 3)
    want = F.conv2d(x.transpose(1, 2).reshape(2, 3, 3, 4), w, padding="same", groups=3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(care.depthwise_conv(x, w, shape=(3, 4)), want)

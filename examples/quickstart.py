"""Quickstart: one call per mechanism, checked against its dense reference.

``attnlab.attention`` runs the fastest implementation that supports the call; ``impl="reference"``
runs the dense oracle (the mechanism's mask written from its paper, in fp32). This script runs
sliding-window attention with GQA (8 query heads over 2 kv heads), compares output and gradients
with the oracle, then asks for the log-sum-exp too and merges two halves of the keys through it.

    PYTHONPATH=src python examples/quickstart.py
"""

import torch

import attnlab

torch.manual_seed(0)
B, H, Hkv, T, D = 1, 8, 2, 1024, 64
q = torch.randn(B, H, T, D, requires_grad=True)  # q [B, H, T, D]; k, v [B, Hkv, S, D]
k, v = torch.randn(2, B, Hkv, T, D).unbind(0)

fast = attnlab.attention(q, k, v, "sliding_window", causal=True, window=128)  # block-sparse executor
ref = attnlab.attention(q, k, v, "sliding_window", causal=True, window=128, impl="reference")
torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
(dq_fast,) = torch.autograd.grad(fast.square().sum(), q)
(dq_ref,) = torch.autograd.grad(ref.square().sum(), q)
torch.testing.assert_close(dq_fast, dq_ref, atol=1e-3, rtol=1e-3)
print(
    f"sliding_window, GQA {H}/{Hkv}, T={T}: out {tuple(fast.shape)}, max |fast - reference| "
    f"{(fast - ref).abs().max():.1e}, gradients equal"
)

# Attention over disjoint key sets merges exactly through the LSE (ring attention, streaming).
with torch.no_grad():
    whole, lse = attnlab.attention_lse(q, k, v, "dense")
    a = attnlab.attention_lse(q, k[:, :, : T // 2], v[:, :, : T // 2], "dense")
    b = attnlab.attention_lse(q, k[:, :, T // 2 :], v[:, :, T // 2 :], "dense")
    merged, merged_lse = attnlab.core.merge_lse(*a, *b)
torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
print(f"dense over two key halves, merged by LSE: equal to one call (lse {tuple(lse.shape)}, fp32)")

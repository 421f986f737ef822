"""A per-layer policy on the small LM: MiniCPM-SALA's 1 sparse : 3 linear layer mix (arXiv 2602.11761).

``Policy.ratio(n_layers, sparse, linear, every=4, rule="sala")`` puts ``n_layers // every`` sparse
layers where SALA puts them and the linear mechanism everywhere else; ``attnlab.nn.TransformerLM``
builds one attention module per layer from it (``attnlab.hf.apply_policy`` does the same to a Hugging
Face model). Policies round-trip through JSON, so an experiment's layer plan is one string. This
script builds a 4-layer SALA LM (lightning x3 + block_topk) and trains it for a few steps on counting
sequences (token t + 1 follows token t, mod 64): the loss starts far above uniform guessing
(lightning's sums are unnormalized) and falls well below it, ln 64 = 4.16.

    PYTHONPATH=src python examples/policy_lm.py
"""

import math

import torch

from attnlab import Policy
from attnlab.nn import LMConfig, TransformerLM

torch.manual_seed(0)
sala = Policy.ratio(
    4, ("block_topk", {"block_size": 8, "top_k": 4, "local_blocks": 1}), ("lightning", {}), every=4, rule="sala"
)
assert Policy.from_json(sala.to_json()) == sala
print("layers:", [layer.mechanism for layer in sala.layers])

lm = TransformerLM(LMConfig(vocab_size=64, dim=64, n_layers=4, heads=4), sala)
opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
for step in range(13):
    start = torch.randint(0, 64, (8, 1))
    loss = lm.loss((start + torch.arange(32)) % 64)  # next-token loss over [8, 32] tokens
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step == 0:
        first = loss.item()
    if step % 4 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")
assert loss.item() < min(first, math.log(64)), "training should beat uniform guessing"
print(f"{sum(p.numel() for p in lm.parameters()):,} parameters; loss {first:.2f} -> {loss.item():.2f}")

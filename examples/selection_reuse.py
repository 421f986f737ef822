"""Selection reuse (HyLRA, arXiv 2602.00777) with block_topk (InfLLM-V2's block top-k).

A selecting mechanism scores key blocks per query block and keeps a budget of them (``select``).
The selection is data, not a side effect: you can look at it (``sel.blocks`` bool
[B, Hkv, n query blocks, n key blocks]), turn it into its token mask, and hand it to a later layer
(``selection=``), which then attends over the same blocks without scoring again. This script selects
on one layer's q and k, checks that reusing the selection on the same tensors changes nothing, then
reuses it for another layer's q, k, v and checks that against the dense oracle under its mask.

    PYTHONPATH=src python examples/selection_reuse.py
"""

import torch

import attnlab
from attnlab import reference

torch.manual_seed(0)
B, H, Hkv, T, D = 1, 8, 2, 2048, 64
options = dict(causal=True, block_size=64, top_k=8, init_blocks=1, local_blocks=2)
q, q2 = torch.randn(2, B, H, T, D).unbind(0)
k, v, k2, v2 = torch.randn(4, B, Hkv, T, D).unbind(0)

sel = attnlab.get("block_topk").select(q, k, **options)  # layer 0 scores its key blocks
kept = sel.blocks.sum(-1).float()  # [B, Hkv, nQB]: blocks kept per query block
print(
    f"selection {tuple(sel.blocks.shape)}: at most {int(kept.max())} of {sel.blocks.shape[-1]} key blocks "
    f"per query block, token density {sel.dense_mask().float().mean():.3f} (causal half: 0.5)"
)

fresh = attnlab.attention(q, k, v, "block_topk", **options)
reused = attnlab.attention(q, k, v, "block_topk", selection=sel, **options)
torch.testing.assert_close(reused, fresh)  # same tensors, same blocks: same output

later = attnlab.attention(q2, k2, v2, "block_topk", selection=sel, **options)  # a later layer: no scoring
oracle = reference.attention(q2, k2, v2, reference.query_head_mask(sel.dense_mask(), H), causal=True).out
torch.testing.assert_close(later, oracle, atol=1e-4, rtol=1e-4)
own = attnlab.get("block_topk").select(q2, k2, **options)  # what layer 2 would have picked itself
overlap = (own.blocks & sel.blocks).sum() / own.blocks.sum()
print(
    f"reused on another layer: equal to the oracle under the reused mask; "
    f"its own selection would share {overlap:.0%} of the blocks (random inputs)"
)

"""What a few mask mechanisms keep: the density of each causal mask at T = 2048, and what it implies.

``attnlab.mask(name, T, S, causal=..., **options)`` is the mechanism's dense bool mask
``[B|1, Hkv|1, T, S]`` written from its paper (the oracle the fast path is tested against; build it
only at small T). Density is the kept share of the causal triangle; the block-sparse executor visits
about that share of tiles, so ``1 / density`` is the ideal speed-up over causal SDPA (the benchmark's
"density-ideal" column). Masks can differ per kv head: strided_shard gives each head its own stripes,
which together cover the whole context.

    PYTHONPATH=src python examples/compare_masks.py
"""

import torch

import attnlab

T = 2048
causal = torch.ones(T, T, dtype=torch.bool).tril()
MASKS = {
    "sliding_window (window 256)": ("sliding_window", {"window": 256}),
    "streaming (4 sinks + 256)": ("streaming", {"sinks": 4, "window": 256}),
    "strided_shard (defaults, 4 kv heads)": ("strided_shard", {"kv_heads": 4}),
    "document (4 packed: 1024/512/256/256)": ("document", {"lengths": [1024, 512, 256, 256]}),
}

print(f"{'mask':40s} {'density':>8s} {'ideal x':>8s}  per kv head")
for label, (name, options) in MASKS.items():
    m = attnlab.mask(name, T, T, causal=True, **options)  # bool [1, Hkv|1, T, T]
    per_head = m.flatten(0, 1).float().sum((1, 2)) / causal.sum()  # kept share of the causal triangle
    density = per_head.mean().item()
    heads = " ".join(f"{d:.3f}" for d in per_head.tolist()) if len(per_head) > 1 else ""
    print(f"{label:40s} {density:8.3f} {1 / density:8.1f}  {heads}")
    if name == "strided_shard":  # the shards differ, and their union is the whole causal triangle
        assert torch.equal(m[0].any(0), causal) and not torch.equal(m[0, 0], m[0, 1])

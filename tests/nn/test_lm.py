"""TransformerLM under policies: causality, tied head, HyPE placement, Flux routing, HyLRA reuse."""

import pytest
import torch

from attnlab import Policy, registry
from attnlab.mechanisms import block_topk
from attnlab.nn import Attention, LMConfig, RoutedAttention, TransformerLM
from attnlab.nn.router import sparsity_loss
from attnlab.spec import Kind

CFG = LMConfig(vocab_size=50, dim=32, n_layers=2, heads=4, kv_heads=2)
SPARSE = ("streaming", {"sinks": 2, "window": 4})


def _ids(T=20, B=2, seed=0):
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def test_causal_tied_and_policy_length_checked():
    torch.manual_seed(0)
    lm = TransformerLM(CFG, Policy.explicit([("sliding_window", {"window": 4}), "dense"]))
    assert lm.head.weight is lm.embed.weight
    ids = _ids()
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    a, b = lm(ids).logits, lm(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        TransformerLM(CFG, Policy.explicit(["dense"] * 3))
    with pytest.raises(ValueError, match="positions"):
        LMConfig(vocab_size=5, positions="alibi")


def test_hype_puts_rope_only_in_linear_family_layers():
    linear = [m.name for m in registry.MECHANISMS if m.kind is Kind.LINEAR]
    names = ["dense", linear[0] if linear else "dense"]
    lm = TransformerLM(LMConfig(vocab_size=50, dim=32, n_layers=2, heads=4, positions="hype"), Policy.explicit(names))
    assert [b.attn.rope is not None for b in lm.blocks] == [False, bool(linear)]
    lm = TransformerLM(LMConfig(vocab_size=50, dim=32, n_layers=2, heads=4, positions="rope"))
    assert all(b.attn.rope is not None for b in lm.blocks)


def test_router_pinned_choices_are_full_and_sparse_attention():
    torch.manual_seed(1)
    attn = Attention(32, 4, 2, "dense", causal=True)
    routed = RoutedAttention(attn, *SPARSE).eval()
    x = torch.randn(2, 12, 32)
    routed.force = 1.0
    torch.testing.assert_close(routed(x).output, attn(x))
    routed.force = 0.0
    q, k, v = attn.project(x)
    sparse = attn.merge_heads(registry.attention(q, k, v, "streaming", causal=True, **SPARSE[1]))
    torch.testing.assert_close(routed(x).output, sparse)


def test_router_trains_through_the_straight_through_choice():
    torch.manual_seed(2)
    lm = TransformerLM(CFG, Policy.router(2, sparse=SPARSE)).train()
    out = lm(_ids())
    assert out.aux_loss.requires_grad
    (out.logits.square().mean() + out.aux_loss).backward()
    grads = [b.attn.router.head[-1].weight.grad for b in lm.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    lm.eval()
    z = lm.blocks[0].attn(lm.blocks[0].norm1(lm.embed(_ids()))).z
    assert set(z.tolist()) <= {0.0, 1.0}  # a hard choice at inference
    assert sparsity_loss([torch.ones(3), torch.zeros(3)], 0.5) == 0


def test_router_policy_json_round_trip():
    p = Policy.router(3, sparse=SPARSE)
    assert Policy.from_json(p.to_json()) == p
    with pytest.raises(ValueError, match="unknown mechanism"):
        Policy.router(2, sparse=("nope", {}))


def test_reuse_in_the_lm_scores_once_per_source(monkeypatch):
    calls = []  # one ranking per select(): the record holds select() itself, so spy on what it calls
    real = block_topk._rank_by_score
    monkeypatch.setattr(block_topk, "_rank_by_score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    opts = {"block_size": 4, "top_k": 2, "init_blocks": 1, "local_blocks": 1}
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=3, heads=4)
    torch.manual_seed(3)
    lm = TransformerLM(cfg, Policy.reuse([-1, 0, 0], **opts))
    lm(_ids(T=24))
    assert len(calls) == 1
    # a budget covering every block: reuse or not, it is dense attention
    full = {"block_size": 4, "top_k": 6, "init_blocks": 1, "local_blocks": 1}
    torch.manual_seed(3)
    reused = TransformerLM(cfg, Policy.reuse([-1, 0, 0], **full))
    torch.manual_seed(3)
    dense = TransformerLM(cfg)
    torch.testing.assert_close(reused(_ids(T=24)).logits, dense(_ids(T=24)).logits, atol=1e-5, rtol=1e-5)


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(4)
    lm = TransformerLM(CFG, Policy.ratio(2, ("sliding_window", {"window": 8}), "dense", every=2))
    ids = _ids(T=32, B=4)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    first = lm.loss(ids).item()
    for _ in range(15):
        opt.zero_grad()
        lm.loss(ids).backward()
        opt.step()
    assert lm.loss(ids).item() < 0.7 * first


def test_reuse_in_the_lm_works_for_any_selecting_mechanism(monkeypatch):
    """DHSA layers reuse a source's selection as block_topk layers do: one selection per source, and
    a budget covering every key makes the stack dense attention."""
    from attnlab.mechanisms import dynamic_hierarchical as dhsa

    calls = []
    real = dhsa._decide
    monkeypatch.setattr(dhsa, "_decide", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=3, heads=4)
    opts = {"chunking": "fixed", "chunk_size": 4, "budget": 9, "local": 2, "sinks": 1}
    TransformerLM(cfg, Policy.reuse([-1, 0, 0], sparse="dynamic_hierarchical", **opts))(_ids(T=24))
    assert len(calls) == 1
    full = {**opts, "budget": 24}
    torch.manual_seed(3)
    reused = TransformerLM(cfg, Policy.reuse([-1, 0, 0], sparse="dynamic_hierarchical", **full))
    torch.manual_seed(3)
    dense = TransformerLM(cfg)
    torch.testing.assert_close(reused(_ids(T=24)).logits, dense(_ids(T=24)).logits, atol=1e-5, rtol=1e-5)

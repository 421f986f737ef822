"""HyLRA layer reuse: the plan against brute force, the overlap and mass profiles, and a model that
really reuses (selection calls counted)."""

import itertools

import pytest
import torch

import attnlab
import attnlab.hf
from attnlab import Policy, reuse
from attnlab.mechanisms import block_topk


def brute_force(T, max_computes, rollback=()):
    """Every set of computing layers; reusers take the most recent computing (non-rollback) layer."""
    L = T.shape[0]
    best = None
    for mask in itertools.product([True, False], repeat=L):
        computes = {j for j in range(L) if mask[j]} | set(rollback) | {0}
        if len(computes) > max_computes:
            continue
        src, values, steps = None, [], []
        for j in range(L):
            if j in computes:
                values.append(1.0)
                steps.append(-1)
                if j not in rollback:
                    src = j
            else:
                values.append(float(T[src, j]))
                steps.append(src)
        key = (min(values), sum(values))
        if best is None or key > best[0]:
            best = (key, steps)
    return best


def value(T, steps, rollback=()):
    vals = [1.0 if s < 0 else float(T[s, j]) for j, s in enumerate(steps)]
    return min(vals), sum(vals)


def test_plan_is_the_optimum_on_a_hand_made_overlap_matrix():
    # layers 1, 2 overlap layer 0 well; layer 3 overlaps nothing earlier; 4 follows 3 closely
    T = torch.tensor(
        [
            [1.0, 0.9, 0.8, 0.1, 0.1],
            [0.0, 1.0, 0.95, 0.2, 0.1],
            [0.0, 0.0, 1.0, 0.3, 0.2],
            [0.0, 0.0, 0.0, 1.0, 0.85],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    steps = reuse.plan(T, max_computes=2)
    assert steps == [-1, 0, 0, -1, 3]  # compute at 0 and 3, the others reuse
    assert value(T, steps) == brute_force(T, 2)[0]
    assert reuse.plan(T, max_computes=5) == [-1] * 5  # a budget for every layer: nothing reused


@pytest.mark.parametrize("seed", range(6))
def test_plan_matches_brute_force_on_random_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    L = 6
    T = torch.rand(L, L, generator=g).triu(1) + torch.eye(L)
    rollback = {3} if seed % 2 else set()
    for budget in (2, 3, 4):
        steps = reuse.plan(T, budget, rollback)
        assert sum(s < 0 for s in steps) <= budget
        assert value(T, steps) == pytest.approx(brute_force(T, budget, rollback)[0])


def test_plan_refuses_a_budget_below_the_forced_layers():
    with pytest.raises(ValueError, match="max_computes"):
        reuse.plan(torch.eye(4), max_computes=1, rollback={2})


def test_mass_ratio_and_rollback():
    uniform = torch.full((1, 1, 8, 8), 1 / 8)
    assert reuse.mass_ratio(uniform, block=2) == pytest.approx(1.0)  # 90% needs every block
    peaked = torch.zeros(1, 1, 8, 8)
    peaked[..., 0] = 1
    assert reuse.mass_ratio(peaked, block=2) == pytest.approx(0.25)  # one block of four
    assert reuse.rollback_layers([0.1, 0.9, 0.5, 0.2], sparsity=0.75) == {1}


def _llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return LlamaForCausalLM(cfg).eval()


def test_a_reuse_policy_really_reuses(monkeypatch):
    calls = []  # one ranking per select(): the record holds select() itself, so spy on what it calls
    real = block_topk._rank_by_score
    monkeypatch.setattr(block_topk, "_rank_by_score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    opts = {"block_size": 4, "top_k": 3, "init_blocks": 1, "local_blocks": 1}
    model = _llama()
    policy = Policy.reuse([-1, 0, 0, -1], **opts)
    assert [x.reuse for x in policy.layers] == [None, 0, 0, None]
    attnlab.hf.apply_policy(model, Policy.from_json(policy.to_json()))
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        reused = model(ids).logits
    assert len(calls) == 2  # layers 0 and 3 score blocks; 1 and 2 take layer 0's selection
    attnlab.hf.apply_policy(model, Policy.explicit([("block_topk", opts)] * 4))
    with torch.no_grad():
        own = model(ids).logits
    assert len(calls) == 6 and not torch.allclose(reused, own)


def test_profile_then_plan_end_to_end():
    model = _llama()
    opts = {"block_size": 4, "top_k": 3, "init_blocks": 1, "local_blocks": 1}
    T, ratios = attnlab.hf.profile_reuse(model, {"input_ids": torch.randint(0, 97, (1, 32))}, **opts)
    assert T.shape == (4, 4) and torch.equal(T.diagonal(), torch.ones(4, dtype=T.dtype))
    assert ((T >= 0) & (T <= 1)).all() and all(0 < r <= 1 for r in ratios)
    rollback = reuse.rollback_layers(ratios, sparsity=0.75)
    steps = reuse.plan(T, max_computes=3, rollback=rollback)
    policy = Policy.reuse(steps, rollback, **opts)
    attnlab.hf.apply_policy(model, policy)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 32))).logits).all()


def test_bad_reuse_policies():
    with pytest.raises(ValueError, match="block_topk"):
        Policy.explicit([attnlab.policy.Layer("dense"), attnlab.policy.Layer("sliding_window", reuse=0)])
    with pytest.raises(ValueError, match="earlier block_topk"):
        Policy.explicit([attnlab.policy.Layer("dense"), attnlab.policy.Layer("block_topk", reuse=0)])
    with pytest.raises(ValueError, match="earlier block_topk"):
        Policy.explicit([attnlab.policy.Layer("block_topk", reuse=0)])
    with pytest.raises(ValueError, match="earlier dynamic_hierarchical"):  # a selection of its own kind
        Policy.explicit([attnlab.policy.Layer("block_topk"), attnlab.policy.Layer("dynamic_hierarchical", reuse=0)])


def test_kept_blocks_read_from_the_layout_are_the_selected_blocks():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 37, 8, generator=g)
    k = torch.randn(2, 2, 37, 8, generator=g)
    for causal in (True, False):
        sel = block_topk.select(q, k, causal=causal, block_size=8, top_k=3, init_blocks=1, local_blocks=1)
        assert torch.equal(reuse.kept_blocks(sel), sel.blocks)


def test_reuse_works_for_any_selecting_mechanism(monkeypatch):
    """HyLRA over DHSA: the profile runs, and a reuse policy selects once per computing layer."""
    from attnlab.mechanisms import dynamic_hierarchical as dhsa

    calls = []
    real = dhsa._decide
    monkeypatch.setattr(dhsa, "_decide", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    opts = {"chunking": "fixed", "chunk_size": 4, "budget": 9, "local": 2, "sinks": 1}
    model = _llama()
    ids = torch.randint(0, 97, (1, 24))
    T, ratios = attnlab.hf.profile_reuse(model, {"input_ids": ids}, sparse="dynamic_hierarchical", **opts)
    assert T.shape == (4, 4) and torch.equal(T.diagonal(), torch.ones(4, dtype=T.dtype))
    assert ((T >= 0) & (T <= 1)).all() and all(0 < r <= 1 for r in ratios)
    calls.clear()
    attnlab.hf.apply_policy(model, Policy.reuse([-1, 0, 0, 0], sparse="dynamic_hierarchical", **opts))
    with torch.no_grad():
        reused = model(ids).logits
    assert len(calls) == 1  # layer 0 selects; 1-3 attend over its selection
    attnlab.hf.apply_policy(model, Policy.explicit([("dynamic_hierarchical", opts)] * 4))
    with torch.no_grad():
        own = model(ids).logits
    assert len(calls) == 5 and not torch.allclose(reused, own)
    with pytest.raises(ValueError, match="selects its keys"):
        attnlab.hf.profile_reuse(model, {"input_ids": ids}, sparse="sliding_window")

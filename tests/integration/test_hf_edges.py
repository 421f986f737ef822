"""The Hugging Face adapter's edges (issue 16): decoding support checked before the prompt runs,
per-token document ids that follow the KV cache, options at load time, padded query rows, and the
README's list of served mechanisms."""

import pathlib
import re

import pytest
import torch
from test_hf import _llama as tiny_llama
from transformers import AutoModelForCausalLM

import attnlab
import attnlab.hf
from attnlab import registry

attnlab.hf.register()

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _llama(impl="eager", options=None):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.set_attn_implementation(impl)
    model.config.attnlab = dict(options or {})
    return model


def _count_layer_calls(model) -> list:
    calls = []
    for layer in attnlab.hf.attention_layers(model):
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def _prompt(n=11, seed=1):
    return torch.randint(1, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _recompute(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        logits = model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


# --- 1. a mechanism that cannot decode fails before any layer runs --------------------------------


@torch.no_grad()
def test_a_mechanism_that_cannot_decode_fails_when_generate_starts():
    assert "cross_causal" not in attnlab.get("neighborhood").patterns  # the record, not the name, decides
    model = _llama("attnlab_neighborhood", {"kernel_size": 3})
    calls = _count_layer_calls(model)
    with pytest.raises(ValueError, match="neighborhood cannot decode with a KV cache") as err:
        model.generate(_prompt(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not calls  # not even the prompt ran
    msg = str(err.value)
    assert "serves only self, self_causal" in msg and "use_cache=False" in msg and "sliding_window" in msg
    # the way out the message names works, and equals a full recompute
    got = model.generate(_prompt(), max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert calls and torch.equal(got, _recompute(model, _prompt(), 3))


@torch.no_grad()
def test_a_policy_layer_that_cannot_decode_fails_when_generate_starts():
    model = _llama("attnlab_policy")
    attnlab.hf.set_layer(model.model.layers[0].self_attn, "dense")
    attnlab.hf.set_layer(model.model.layers[1].self_attn, "neighborhood", kernel_size=3)
    calls = _count_layer_calls(model)
    with pytest.raises(ValueError, match="neighborhood cannot decode"):
        model.generate(_prompt(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not calls


@torch.no_grad()
def test_generate_check_leaves_other_models_and_decodable_mechanisms_alone():
    eager = _llama()
    want = eager.generate(_prompt(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    dense = _llama("attnlab_dense")
    assert torch.equal(dense.generate(_prompt(), max_new_tokens=4, do_sample=False, pad_token_id=0), want)
    assert (
        set(attnlab.hf.decodable()) == {n for n in attnlab.hf.served() if "cross_causal" in registry.get(n).patterns}
        and "neighborhood" not in attnlab.hf.decodable()
    )


# --- 2. document decodes with per-token ids; lengths= says how ------------------------------------


@torch.no_grad()
def test_document_with_lengths_fails_when_generate_starts_and_says_how():
    model = _llama("attnlab_document", {"lengths": (4, 7)})
    calls = _count_layer_calls(model)
    with pytest.raises(ValueError, match=r"first decode step \(T=1, S=12\).*attnlab.hf.per_token"):
        model.generate(_prompt(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not calls


@torch.no_grad()
def test_document_ids_per_token_generate_equals_recompute():
    ids = torch.tensor([0] * 4 + [1] * 7)
    model = _llama("attnlab_document", {"document_ids": attnlab.hf.per_token(ids)})
    prompt = _prompt()
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, _recompute(model, prompt, 8))
    # the mask is applied: the second document's last token does not see the first document
    dense = _llama("attnlab_dense")
    assert not torch.allclose(model(prompt).logits[:, -1], dense(prompt).logits[:, -1])
    # and it is the document mask: a second document alone, by itself, gives the same last logits
    torch.testing.assert_close(model(prompt).logits[:, -1], dense(prompt[:, 4:]).logits[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_per_token_ids_follow_each_row_of_a_left_padded_batch():
    """Row b's ids are cut to its real keys as its keys are: each row generates as it would alone."""
    a, b = _prompt(11, seed=2), _prompt(7, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    ids = torch.tensor([[0] * 5 + [1] * 6, [9] * 4 + [0] * 3 + [1] * 4])  # row 1: 4 pads, then 3 + 4 tokens
    model = _llama("attnlab_document", {"document_ids": attnlab.hf.per_token(ids)})
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, alone, own in ((0, a, ids[0]), (1, b, ids[1, 4:])):
        model.config.attnlab = {"document_ids": attnlab.hf.per_token(own)}
        want = model.generate(alone, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, -5:], want[0, -5:])


def test_per_token_cuts_and_extends_and_refuses_bad_ids():
    ids = attnlab.hf.per_token(torch.tensor([[0, 0, 1], [2, 3, 3]]))
    assert torch.equal(ids.at(2), torch.tensor([[0, 0], [2, 3]]))
    assert torch.equal(ids.at(5), torch.tensor([[0, 0, 1, 1, 1], [2, 3, 3, 3, 3]]))
    assert torch.equal(ids.row(5, 1, slice(1, 4)), torch.tensor([[3, 3, 3]]))
    with pytest.raises(ValueError, match="per_token needs an integer tensor"):
        attnlab.hf.per_token(torch.zeros(3))
    with pytest.raises(ValueError, match=r"per_token ids must be \[P\] or \[B, P\]"):
        attnlab.hf.per_token(torch.zeros(1, 1, 3, dtype=torch.long))


# --- 3. options at load time ----------------------------------------------------------------------


@torch.no_grad()
def test_from_pretrained_sets_the_options_through_the_config(tmp_path):
    ids = _prompt()
    _llama().save_pretrained(tmp_path / "tiny")
    model = attnlab.hf.from_pretrained(tmp_path / "tiny", "sliding_window", {"window": 3})
    assert model.config._attn_implementation == "attnlab_sliding_window"
    assert model.config.attnlab == {"window": 3}
    want = _llama("attnlab_sliding_window", {"window": 3})(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)
    assert not torch.allclose(want, _llama()(ids).logits)  # the window was applied
    # a saved model keeps them: plain transformers loading restores config.attnlab
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="attnlab_sliding_window")
    assert again.config.attnlab == {"window": 3}
    torch.testing.assert_close(again(ids).logits, want, atol=0, rtol=0)


def test_from_pretrained_refuses_bad_options_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        attnlab.hf.from_pretrained(tmp_path / "absent", "sliding_window", {"windw": 3})
    with pytest.raises(ValueError, match="linear mechanism"):
        attnlab.hf.from_pretrained(tmp_path / "absent", "linear")
    with pytest.raises(ValueError, match="not attn_implementation= / attnlab="):
        attnlab.hf.from_pretrained(tmp_path / "absent", "dense", attnlab={"window": 3})


# --- 4. padded query rows are 0 -------------------------------------------------------------------


@torch.no_grad()
def test_padded_query_rows_are_zero_where_eager_averages():
    """The attention output of a left-padded batch: real rows equal eager's, padded rows are exactly 0
    (no allowed key: 0 by contract), where eager's softmax over an all-masked row gives an average."""
    batch = torch.cat([_prompt(9, seed=4), torch.cat([torch.zeros(1, 3, dtype=torch.long), _prompt(6, seed=5)], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    outs = {}
    for impl in ("eager", "attnlab_dense"):
        model = _llama(impl)
        hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, impl=impl: outs.__setitem__(impl, a[0])  # [B, T, H * D]: attention output
        )
        model(batch, attention_mask=mask)
        hook.remove()
    real, padded = mask.bool(), ~mask.bool()
    torch.testing.assert_close(outs["attnlab_dense"][real], outs["eager"][real], atol=1e-6, rtol=1e-5)
    assert torch.equal(outs["attnlab_dense"][padded], torch.zeros_like(outs["attnlab_dense"][padded]))
    assert outs["eager"][padded].abs().amax() > 1e-3  # eager's uniform average is not 0


# --- 5. the README lists what is served, from the registry ----------------------------------------


def _readme_row(label: str) -> list[str]:
    section = README.read_text().split("## In a Hugging Face model", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {label}"))
    return re.findall(r"`([a-z_]+)`", row.split("|")[2])


def test_readme_lists_the_served_mechanisms_from_the_registry():
    served, decodable = attnlab.hf.served(), attnlab.hf.decodable()
    assert _readme_row("served, decodes with a KV cache") == decodable
    assert _readme_row("served, full forwards only") == [n for n in served if n not in decodable]
    assert _readme_row("not served") == [m.name for m in registry.MECHANISMS if m.name not in served]
    assert all(not registry.get(n).drop_in for n in _readme_row("not served"))

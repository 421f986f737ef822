"""A Hugging Face model on an attnlab mechanism: a tiny random Llama generating with a sliding window.

``attnlab.hf.register()`` makes every softmax mechanism an ``attn_implementation`` named
``attnlab_<name>``; the mechanism's options live in ``model.config.attnlab``. Decoding with the KV
cache runs the same mechanism on one query row against the cached keys (causal masks are
bottom-right aligned). This script checks two things: with a window wider than the whole sequence,
sliding-window generation equals eager attention token for token; with a narrow window it still
generates, and the logits differ from eager's, since the window now drops keys.

    PYTHONPATH=src python examples/hf_llama.py        (needs the hf extra: pip install -e ".[hf]")
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnlab.hf

attnlab.hf.register()
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
model = LlamaForCausalLM(cfg).eval()
prompt = torch.randint(0, 128, (1, 24))


def generate(implementation: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_attn_implementation(implementation)
    model.config.attnlab = options
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        return tokens, model(tokens).logits


eager_tokens, eager_logits = generate("eager")
wide_tokens, wide_logits = generate("attnlab_sliding_window", window=64)  # the window covers everything
assert torch.equal(wide_tokens, eager_tokens)
torch.testing.assert_close(wide_logits, eager_logits, atol=1e-4, rtol=1e-4)
print("window 64 (> 32 tokens): same tokens as eager:", wide_tokens[0, 24:].tolist())

narrow_tokens, narrow_logits = generate("attnlab_sliding_window", window=4)
gap = (narrow_logits - eager_logits)[:, 4:].abs().max().item()  # rows past the first window
assert gap > 1e-3, "a 4-token window must change the logits of later positions"
print("window 4:", narrow_tokens[0, 24:].tolist(), f"(logits differ from eager's by up to {gap:.2f})")

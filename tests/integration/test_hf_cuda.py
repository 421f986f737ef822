"""The Hugging Face adapter on CUDA: a tiny Llama decodes with a KV cache exactly as a full recompute
does, for every causal mechanism test_hf.py decodes on the CPU (its helpers, imported). The CUDA cases
are skipped without a GPU; one CPU case keeps the check itself running in CI."""

import pytest
import torch
from test_hf import CAUSAL, FIXED_LAYOUT, POOLED_QUERIES, _decoder, _llama, _options

NAMES = [n for n in CAUSAL if n not in POOLED_QUERIES | FIXED_LAYOUT]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Logit-level, so it also runs on the CPU for every mechanism (test_hf.py compares tokens only: it
# missed global_local's partial pooled block, which decode saw and a recompute did not).
PARAMS = [pytest.param("cuda", n, marks=NO_CUDA, id=f"cuda-{n}") for n in NAMES]
PARAMS += [pytest.param("cpu", n, id=f"cpu-{n}") for n in NAMES]
PROMPT, NEW = 11, 8


def _on(device: str, options: dict) -> dict:
    """Tensor options (moh's gates) on the model's device, as a user on that device passes them."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}


@pytest.mark.parametrize(("device", "name"), PARAMS)
@torch.no_grad()
def test_cached_generate_equals_full_recompute_on_device(device, name):
    model = _decoder(_llama, "attnlab_" + name, _on(device, _options(name))).to(device)
    prompt = torch.randint(0, 97, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    out = model.generate(
        prompt, max_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    seq = out.sequences
    assert seq.device.type == device and seq.shape == (1, PROMPT + NEW)
    cached = torch.cat(out.logits)  # [NEW, V]: each step's logits, from the KV cache
    # the recompute: every prefix of the generated sequence run from scratch, no cache
    full = torch.cat([model(seq[:, :n], use_cache=False).logits[:, -1] for n in range(PROMPT, PROMPT + NEW)])
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    # greedy decoding picked the recompute's argmax wherever its top two logits are not a near-tie
    top2 = full.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-3
    assert clear.sum() >= NEW // 2
    assert torch.equal(seq[0, PROMPT:][clear], full.argmax(-1)[clear])

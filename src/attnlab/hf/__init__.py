"""Hugging Face transformers integration: any softmax-family mechanism as an attention implementation.

    import attnlab.hf
    attnlab.hf.register()                      # explicit; nothing registers at import
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnlab_sliding_window")
    model.config.attnlab = {"window": 256}     # the mechanism's options (registry defaults otherwise)
    model = attnlab.hf.from_pretrained(path, "sliding_window", {"window": 256})   # the same, at load time

Per-layer mechanisms come from ``attnlab.hf.set_layer`` or ``attnlab.hf.apply_policy`` and are read
by the ``attnlab_policy`` implementation; ``attnlab_<name>`` uses ``name`` with ``config.attnlab``.

* ``register.py``: registration with transformers and the up-front option check.
* ``masks.py``: transformers' masks (padding as runs of real keys; anything else on the dense oracle).
* ``layers.py``: a layer's one setting (:class:`LayerSetting`), Flux routing and HyLRA reuse per call.
* ``apply.py``: placing a ``Policy`` on a model; HyLRA's offline profile.
* ``decode.py``: ``generate()`` checks decoding support before the prompt runs.
* ``tokens.py``: per-token options (``per_token(ids)``) that follow a growing KV cache.

A query row with no real key (a padded position) outputs 0, the library's contract; eager attention
gives such a row a uniform average instead. Real tokens match; compare padded batches on real rows.
"""

from attnlab.hf.apply import apply_policy, profile_reuse
from attnlab.hf.decode import check_generate, decodable
from attnlab.hf.layers import LayerSetting, attention_layers, layer_setting, router_loss, served, set_layer, setting
from attnlab.hf.masks import key_runs, masked_attention
from attnlab.hf.register import POLICY, PREFIX, check, from_pretrained, register, registered
from attnlab.hf.tokens import PerToken, per_token

__all__ = [
    "POLICY",
    "PREFIX",
    "LayerSetting",
    "PerToken",
    "apply_policy",
    "attention_layers",
    "check",
    "check_generate",
    "decodable",
    "from_pretrained",
    "key_runs",
    "layer_setting",
    "masked_attention",
    "per_token",
    "profile_reuse",
    "register",
    "registered",
    "router_loss",
    "served",
    "set_layer",
    "setting",
]

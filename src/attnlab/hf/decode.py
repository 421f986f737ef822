"""Decoding support, checked when ``generate()`` starts rather than at its first decode step.

With a KV cache, ``generate()`` runs the prompt once (T = S: ``self_causal``) and then one query over
all cached keys per step (T = 1 < S: ``cross_causal``). A mechanism whose record lacks that pattern
(``neighborhood``: a window centred on each query of a full sequence) or whose options cannot
describe a longer sequence (``document``'s ``lengths=``) would fail only after the prompt ran.

transformers gives no earlier place to see the cache: the mask builder registered with
``AttentionMaskInterface`` receives sizes and the config, never the cache, and a plain forward
builds a cache too. So :func:`hook_generate`, called by ``attnlab.hf.register()``, wraps
``GenerationMixin.generate`` once: before anything runs, a model whose attention implementation is
an ``attnlab_*`` one has every attention layer's setting checked against the first decode call
(one query over prompt + 1 keys), from the records' ``patterns`` and option checks. Models not using
attnlab pass through untouched. ``generate(..., use_cache=False)`` recomputes the whole sequence
each step (``self_causal`` only), so it is not checked here: every forward checks itself.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from attnlab import registry
from attnlab.hf import layers
from attnlab.hf.layers import POLICY, PREFIX
from attnlab.hf.tokens import at_length


def decodable() -> list[str]:
    """Served mechanisms that decode with a KV cache (their records list ``cross_causal``)."""
    return [n for n in layers.served() if "cross_causal" in registry.get(n).patterns]


def check_generate(model: nn.Module, prompt_len: int | None, causal: bool = True) -> None:
    """Raise ValueError if ``model`` cannot decode with a KV cache after a ``prompt_len``-token prompt
    (None: the length is unknown and only the patterns are checked)."""
    impl = getattr(_text_config(model), "_attn_implementation", None)
    if not isinstance(impl, str) or not impl.startswith(PREFIX):
        return
    T, S = 1, None if prompt_len is None else prompt_len + 1
    for name, options in _settings(model, None if impl == POLICY else impl.removeprefix(PREFIX)):
        mech = registry.get(name)
        pattern = registry.pattern(1, 2, causal)  # one query over more keys: what every decode step is
        if pattern not in mech.patterns:
            raise ValueError(
                f"{name} cannot decode with a KV cache: each generate() step is one query over the cached keys "
                f"({pattern}) and {name} serves only {', '.join(sorted(mech.patterns))}. Use "
                f"generate(..., use_cache=False) (every step recomputes the whole sequence) or a mechanism that "
                f"decodes: {', '.join(decodable())}"
            )
        if S is not None:
            try:
                mech.resolve(T, S, causal, at_length(options, S))
            except ValueError as e:
                raise ValueError(
                    f"{name}'s options cannot serve generate()'s first decode step (T=1, S={S}): {e}. An option "
                    "that describes each token must grow with the sequence: give per-token ids as "
                    "attnlab.hf.per_token(ids)"
                ) from None


def hook_generate() -> None:
    """Wrap ``GenerationMixin.generate`` with :func:`check_generate`, once (see the module docstring)."""
    from transformers import GenerationMixin

    original = GenerationMixin.generate
    if getattr(original, "_attnlab_checked", False):
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if _uses_cache(self, kwargs):
            check_generate(self, _prompt_len(args, kwargs), bool(getattr(_text_config(self), "is_causal", True)))
        return original(self, *args, **kwargs)

    generate._attnlab_checked = True
    GenerationMixin.generate = generate


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _settings(model: nn.Module, default: str | None) -> list[tuple[str, dict]]:
    """Every (mechanism, options) the model's attention layers run, Flux's sparse branches included."""
    try:
        modules = layers.attention_layers(model)
    except ValueError:  # no layer_idx-tagged modules: the implementation's mechanism with the config's options
        return [] if default is None else [(default, dict(getattr(_text_config(model), "attnlab", None) or {}))]
    out = []
    for module in modules:
        out.append(layers.layer_setting(module, default))
        pinned = layers.setting(module)
        if pinned is not None and pinned.route is not None:
            out.append(pinned.route)
    return out


def _uses_cache(model: nn.Module, kwargs: dict) -> bool:
    if kwargs.get("use_cache") is not None:
        return bool(kwargs["use_cache"])
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, "use_cache", True) is not False


def _prompt_len(args: tuple, kwargs: dict) -> int | None:
    for x in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(x, Tensor) and x.dim() >= 2:
            return int(x.shape[1])
    return None

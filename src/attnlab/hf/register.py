"""Registration with transformers: every served mechanism as an attention implementation.

Each mechanism is registered twice under ``attnlab_<name>``: with ``AttentionInterface`` (the
attention itself) and with ``AttentionMaskInterface`` (transformers' boolean SDPA mask, so causal and
padding masks always reach us; the docs warn that without it the mask is silently ``None``). The mask
builder also validates the layer's options against the call before any layer runs.
``attnlab_policy`` runs each layer's pinned setting (``attnlab.hf.layers``). Registering also makes
``generate()`` check decoding support before the prompt runs (``attnlab.hf.decode``).

Options at load time go through the config: :func:`from_pretrained` sets ``config.attnlab`` before
the model is built, and a saved model's ``config.json`` keeps them.
"""

from __future__ import annotations

from attnlab import registry
from attnlab.hf import decode, layers
from attnlab.hf.tokens import at_length

PREFIX, POLICY = layers.PREFIX, layers.POLICY


def register() -> list[str]:
    """Register every served mechanism (and ``attnlab_policy``) with transformers; returns the names."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    decode.hook_generate()
    names = [PREFIX + n for n in layers.served()] + [POLICY]
    for full in names:
        default = None if full == POLICY else full.removeprefix(PREFIX)
        AttentionInterface.register(full, _attention_fn(default))
        AttentionMaskInterface.register(full, _mask_fn(default))
    return names


def registered(name: str) -> bool:
    """Whether transformers knows the attention implementation ``name`` (its public mapping API)."""
    from transformers import AttentionInterface

    return name in AttentionInterface()


def check(name: str, T: int, S: int, causal: bool, options: dict) -> None:
    """Can ``name`` with ``options`` serve a (T queries, S keys, causal) attention call? Run before
    any layer of a forward, so a mechanism that cannot serve the model fails up front, saying why."""
    mech = registry.get(name)
    pat = registry.pattern(T, S, causal)
    if pat not in mech.patterns:
        raise ValueError(
            f"{name} cannot serve this model's {pat} attention (T={T}, S={S}); "
            f"it supports {', '.join(sorted(mech.patterns))}"
        )
    try:
        mech.resolve(T, S, causal, at_length(options, S))
    except ValueError as e:
        raise ValueError(f"config.attnlab for {name}: {e}") from None


def from_pretrained(name_or_path, mechanism: str, options: dict | None = None, *, auto_class=None, **kwargs):
    """Load a transformers model running ``mechanism`` (a served name, or ``"policy"``) with
    ``options`` as ``config.attnlab``: ``from_pretrained(path, "sliding_window", {"window": 256})``.
    ``kwargs`` go to transformers' ``from_pretrained``; ``auto_class`` defaults to
    ``AutoModelForCausalLM``. Option names are checked before anything loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "attn_implementation" in kwargs or "attnlab" in kwargs:
        raise ValueError(
            "from_pretrained takes the mechanism and its options as arguments, not attn_implementation= / attnlab="
        )
    options = dict(options or {})
    if mechanism != POLICY.removeprefix(PREFIX):
        layers.servable(mechanism).check_option_names(options)
    elif options:
        raise ValueError("mechanism='policy' takes no options: pin each layer (attnlab.hf.set_layer / apply_policy)")
    if not registered(PREFIX + mechanism):
        register()
    config = kwargs.pop("config", None)
    if config is None:
        shared = ("cache_dir", "local_files_only", "revision", "token", "trust_remote_code", "subfolder")
        config = AutoConfig.from_pretrained(name_or_path, **{k: kwargs[k] for k in shared if k in kwargs})
    config.attnlab = options
    auto_class = auto_class or AutoModelForCausalLM
    return auto_class.from_pretrained(name_or_path, config=config, attn_implementation=PREFIX + mechanism, **kwargs)


def _mask_fn(default: str | None):
    def build(*args, config=None, **kwargs):
        from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

        if config is not None and default is not None:
            named = dict(zip(("batch_size", "q_length", "kv_length"), args)) | kwargs
            causal = kwargs.get("mask_function") is not bidirectional_mask_function
            check(default, named["q_length"], named["kv_length"], causal, getattr(config, "attnlab", None) or {})
        return sdpa_mask(*args, config=config, **kwargs)

    return build


def _attention_fn(default: str | None):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
        """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, S, D] ->
        ([B, T, H, D], None). Weights are never materialized on the fast path, so none are returned."""
        if dropout:
            raise ValueError("attnlab attention has no attention dropout: call model.eval() or set it to 0")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        out = layers.run(module, query, key, value, attention_mask, causal, scaling, default)
        return out.transpose(1, 2).contiguous(), None

    return attention

"""Hugging Face transformers integration: any softmax-family mechanism as an attention implementation.

    import attnlab.hf
    attnlab.hf.register()                      # explicit; nothing registers at import
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnlab_sliding_window")
    model.config.attnlab = {"window": 256}     # the mechanism's options (registry defaults otherwise)

Each mechanism is registered twice under ``attnlab_<name>``: with ``AttentionInterface`` (the
attention itself) and with ``AttentionMaskInterface`` (transformers' boolean SDPA mask, so causal and
padding masks always reach us; the docs warn that without it the mask is silently ``None``). The mask
builder also validates the layer's options against the call before any layer runs.

Masks are never dropped. transformers hands us its [B, 1, T, S] mask (causal and padding) or None
(plain causal / bidirectional). A mask that is "the causal structure restricted to a contiguous run
of real keys" per batch row (left padding in decoders, right padding in encoders) is served by the
fast path on each row's real tokens, so the mechanism sees every sequence without its pads: a
streaming sink is the first real token, not a pad. Query rows outside the real run output 0 (they are
padding). Any other mask (packed sequences, custom 4D masks) is combined with the mechanism's own mask
and run on the dense reference, exactly, at O(T*S) cost; data-dependent mechanisms refuse such masks.

Per-layer mechanisms come from ``attnlab.hf.set_layer`` (a policy sets them) and are read by the
``attnlab_policy`` implementation; ``attnlab_<name>`` uses ``name`` with ``config.attnlab`` options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab import reference as _reference
from attnlab import registry, reuse

PREFIX = "attnlab_"
POLICY = PREFIX + "policy"


def served() -> list[str]:
    """Mechanisms that can stand in for a Hugging Face attention layer: softmax attention over q, k, v
    (linear-family mechanisms change what a layer computes and need their own modules)."""
    return [m.name for m in registry.MECHANISMS if m.drop_in]


def register() -> list[str]:
    """Register every served mechanism (and ``attnlab_policy``) with transformers; returns the names."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = [PREFIX + n for n in served()] + [POLICY]
    for full in names:
        default = None if full == POLICY else full.removeprefix(PREFIX)
        AttentionInterface.register(full, _attention_fn(default))
        AttentionMaskInterface.register(full, _mask_fn(default))
    return names


def _servable(mechanism: str) -> registry.Mechanism:
    """The registry record, if it can stand in for a transformers attention layer."""
    mech = registry.get(mechanism)
    if not mech.drop_in:
        raise ValueError(
            f"{mechanism} is a {mech.kind.value} mechanism and cannot replace a softmax attention layer; "
            f"served: {', '.join(served())}"
        )
    return mech


def set_layer(module: torch.nn.Module, mechanism: str, **options) -> None:
    """Pin one attention module to ``mechanism`` with ``options`` (validated now, not mid-forward)."""
    _servable(mechanism).check_option_names(options)
    module.attnlab = (mechanism, dict(options))


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules in layer order (transformers tags each with ``layer_idx``)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a layer_idx; attnlab.hf cannot place a policy"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def apply_policy(model: torch.nn.Module, policy) -> torch.nn.Module:
    """Pin each attention layer to the policy's mechanism and switch the model to ``attnlab_policy``.
    Every layer is checked before any is changed, so a bad policy leaves the model as it was."""
    layers = attention_layers(model)
    policy.check(len(layers))
    for layer in policy.layers:  # refuse non-softmax mechanisms before touching the model
        _servable(layer.mechanism)
        if layer.route is not None:
            _servable(layer.route["mechanism"])
    store: dict = {}  # HyLRA: this model's block selections of the current forward, by layer
    for module, layer in zip(layers, policy.layers):
        set_layer(module, layer.mechanism, **layer.options)
        _set_router(module, layer.route)
        module.attnlab_reuse = None if layer.reuse is None else layers[layer.reuse].layer_idx
        module.attnlab_store = store
    if POLICY not in _registered():
        register()
    model.set_attn_implementation(POLICY)
    return model


def profile_reuse(model: torch.nn.Module, inputs: dict, **options):
    """HyLRA's offline profile on calibration ``inputs`` (keyword arguments of ``model``): every layer
    runs ``block_topk`` with ``options``; returns the layers' selection overlap T [L, L] and their
    mass ratios (share of blocks needed for 90% of the attention mass; materializes the weights, so
    keep calibration inputs short). Feed them to ``attnlab.reuse.plan`` and ``Policy.reuse``."""
    from attnlab.policy import Policy

    layers = attention_layers(model)
    apply_policy(model, Policy.explicit([("block_topk", options)] * len(layers)))
    ratios: dict = {}
    for module in layers:
        module.attnlab_profile = ratios
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for module in layers:
            module.attnlab_profile = None
    store = layers[0].attnlab_store
    selections = [store[m.layer_idx].blocks for m in layers]
    return reuse.overlap(selections), [ratios[m.layer_idx] for m in layers]


def _set_router(module: torch.nn.Module, route: dict | None) -> None:
    """Flux on a transformers layer: a trainable ``FluxRouter`` submodule choosing, per sequence,
    between the layer's mechanism and ``route``'s sparse one (its parameters join the model's)."""
    from attnlab.nn.router import FluxRouter

    if route is None:
        if hasattr(module, "attnlab_router"):
            del module.attnlab_router
        module.attnlab_route = None
        return
    head_dim = (
        module.head_dim
        if hasattr(module, "head_dim")
        else module.config.hidden_size // module.config.num_attention_heads
    )
    if not isinstance(getattr(module, "attnlab_router", None), FluxRouter):
        module.attnlab_router = FluxRouter(int(head_dim))
    module.attnlab_route = (route["mechanism"], dict(route["options"]))
    module.attnlab_z = None


def router_loss(model: torch.nn.Module, target: float) -> Tensor:
    """Flux's sparsity loss over the routed layers of the last forward: |1 - mean z - target|."""
    from attnlab.nn.router import sparsity_loss

    zs = [m.attnlab_z for m in attention_layers(model) if getattr(m, "attnlab_z", None) is not None]
    if not zs:
        raise ValueError("no routed layer ran: apply a Policy.router(...) policy and run a forward first")
    return sparsity_loss(zs, target)


def _routed(module, q, k, v, mask, causal, scale, full: tuple[str, dict]) -> Tensor:
    """out = z·full + (1 − z)·sparse per sequence; only the chosen branch runs at inference. The
    router reads the queries it is given (after the model's RoPE: transformers rotates before the
    attention function; the paper pools pre-RoPE queries)."""
    from attnlab.nn.router import mix

    z = module.attnlab_router(q)  # [B]
    module.attnlab_z = z
    branches = {True: full, False: module.attnlab_route}

    def run(is_full: bool, rows: Tensor) -> Tensor:
        name, opts = branches[is_full]
        m = None if mask is None else mask[rows] if mask.shape[0] > 1 else mask
        return masked_attention(q[rows], k[rows], v[rows], m, name, causal=causal, scale=scale, **opts)

    return mix(z, module.training, run)


def _registered() -> set[str]:
    from transformers import AttentionInterface

    return set(AttentionInterface._global_mapping)


def layer_setting(module: torch.nn.Module, default: str | None) -> tuple[str, dict]:
    """(mechanism, options) for one attention module: its pinned setting, else ``default`` with the
    model config's ``attnlab`` options."""
    pinned = getattr(module, "attnlab", None)
    if pinned is not None:
        return pinned
    if default is None:
        raise ValueError(
            f"attn_implementation={POLICY!r} needs every attention layer pinned: apply a policy "
            "(attnlab.hf.apply_policy) or call attnlab.hf.set_layer on each layer"
        )
    return default, dict(getattr(getattr(module, "config", None), "attnlab", None) or {})


def _mask_fn(default: str | None):
    def build(*args, config=None, **kwargs):
        from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

        if config is not None and default is not None:
            named = dict(zip(("batch_size", "q_length", "kv_length"), args)) | kwargs
            causal = kwargs.get("mask_function") is not bidirectional_mask_function
            check(default, named["q_length"], named["kv_length"], causal, getattr(config, "attnlab", None) or {})
        return sdpa_mask(*args, config=config, **kwargs)

    return build


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
        mech.resolve(T, S, causal, dict(options))
    except ValueError as e:
        raise ValueError(f"config.attnlab for {name}: {e}") from None


def _attention_fn(default: str | None):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
        """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, S, D] ->
        ([B, T, H, D], None). Weights are never materialized on the fast path, so none are returned."""
        if dropout:
            raise ValueError("attnlab attention has no attention dropout: call model.eval() or set it to 0")
        name, options = layer_setting(module, default)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        store = getattr(module, "attnlab_store", None)
        if getattr(module, "attnlab_route", None) is not None:
            out = _routed(module, query, key, value, attention_mask, causal, scaling, (name, options))
            return out.transpose(1, 2).contiguous(), None
        if name == "block_topk" and store is not None:
            out = _selection_sharing(module, store, query, key, value, attention_mask, causal, scaling, options)
            return out.transpose(1, 2).contiguous(), None
        out = masked_attention(query, key, value, attention_mask, name, causal=causal, scale=scaling, **options)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _selection_sharing(module, store, q, k, v, mask, causal, scale, options) -> Tensor:
    """HyLRA at run time: a computing layer records its block selection, a reusing layer attends
    over its source's selection without scoring."""
    runs = None if mask is None else key_runs(_as_bool(mask), causal)
    if mask is not None and (runs is None or any(run != (0, k.shape[2]) for run in runs)):
        raise ValueError("layer reuse (HyLRA) runs on unpadded batches: selections are shared across layers per row")
    src = getattr(module, "attnlab_reuse", None)
    sel = reuse.shared_selection(store, module.layer_idx, src, q, k, causal=causal, scale=scale, **options)
    profile = getattr(module, "attnlab_profile", None)
    if src is None and profile is not None:  # profiling pass: how much of the mass needs how many blocks
        weights = _reference.attention(q, k, v, causal=causal, scale=scale).weights
        profile[module.layer_idx] = reuse.mass_ratio(weights, options.get("block_size", 64))
    return registry.attention(q, k, v, "block_topk", causal=causal, scale=scale, **{**options, "selection": sel})


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mechanism: str, *, causal: bool, scale=None, **options
) -> Tensor:
    """``attnlab.attention`` under an extra transformers-style mask [B or 1, 1, T, S] (bool, True =
    allowed, or additive float 0 / min). See the module docstring for how each mask is served."""
    if mask is None:
        return registry.attention(q, k, v, mechanism, causal=causal, scale=scale, **options)
    allowed = _as_bool(mask)
    runs = key_runs(allowed, causal)
    if runs is None:
        return _dense_fallback(q, k, v, allowed, mechanism, causal, scale, options)
    B, H, T, _ = q.shape
    S = k.shape[2]
    if all(lo == 0 and hi == S for lo, hi in runs):
        return registry.attention(q, k, v, mechanism, causal=causal, scale=scale, **options)
    out = q.new_zeros(B, H, T, v.shape[-1])
    for b, (lo, hi) in enumerate(runs):
        rows = slice(max(0, lo - (S - T)), max(0, hi - (S - T)))  # query rows at real positions
        if hi <= lo or rows.start >= rows.stop:
            continue
        qb, kb, vb = q[b : b + 1, :, rows], k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi]
        out[b : b + 1, :, rows] = registry.attention(qb, kb, vb, mechanism, causal=causal, scale=scale, **options)
    return out


def _as_bool(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be bool or an additive float mask, got {mask.dtype}")
    allowed = mask == 0
    if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
        raise ValueError(
            "attention_mask carries an additive bias (values other than 0 and -inf); attnlab "
            "mechanisms only take allowed/blocked masks"
        )
    return allowed


def key_runs(allowed: Tensor, causal: bool) -> list[tuple[int, int]] | None:
    """Per batch row, the run [lo, hi) of real keys when ``allowed`` [B, 1, T, S] is exactly the
    (bottom-right) causal or full structure restricted to that run on every real query row; else None."""
    if allowed.dim() != 4 or allowed.shape[1] != 1:
        return None
    B, _, T, S = allowed.shape
    j = torch.arange(S, device=allowed.device)
    p = torch.arange(T, device=allowed.device) + S - T  # query positions
    runs = []
    for b in range(allowed.shape[0]):
        m = allowed[b, 0]
        seen = m.any(0).nonzero().flatten()
        if seen.numel() == 0:
            runs.append((0, 0))
            continue
        lo, hi = int(seen[0]), int(seen[-1]) + 1
        real = (p >= lo) & (p < hi)
        want = (j >= lo) & (j < hi)
        want = want & (j <= p.unsqueeze(1)) if causal else want.expand(T, S)
        if not torch.equal(m[real], want[real]):
            return None
        runs.append((lo, hi))
    return runs


def _dense_fallback(q, k, v, allowed, mechanism, causal, scale, options) -> Tensor:
    mech = registry.get(mechanism)
    if mech.mask is None or mech.oracle is not None:
        raise ValueError(
            f"{mechanism} cannot be combined with this attention mask (not a padding mask over contiguous real "
            "tokens); pass unpadded or left-padded batches"
        )
    own = mech.dense_mask(q.shape[2], k.shape[2], causal=causal, kv_heads=k.shape[1], **options)
    own = _reference.query_head_mask(own.to(q.device), q.shape[1])  # [B|1, H|1, T, S]
    return _reference.attention(q, k, v, own & allowed, scale=scale).out

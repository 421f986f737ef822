"""What each transformers attention layer runs: its pinned setting, and the per-call dispatch.

A layer pinned by ``set_layer`` or a policy carries one attribute, ``attnlab``: a
:class:`LayerSetting` with the mechanism and its options, and where the policy asks for them
HyLRA's selection reuse (Ai et al., arXiv 2602.00777) and Flux's learned router (a per-sequence
choice between full and sparse attention). An unpinned layer runs the attention implementation's
mechanism with the model config's ``attnlab`` options.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlab import reference as _reference
from attnlab import registry, reuse
from attnlab.hf.masks import masked_attention, unpadded
from attnlab.hf.tokens import at_length

ATTR = "attnlab"  # the one attribute a pinned attention module carries
PREFIX = "attnlab_"  # attn_implementation="attnlab_<mechanism>"
POLICY = PREFIX + "policy"  # the implementation that reads each layer's own setting


class LayerSetting(nn.Module):
    """One attention layer's setting. A module rather than a plain record so that a Flux router's
    parameters join the model's (optimizer, ``state_dict``, ``.to()``) as a submodule of the layer.

    ``mechanism``, ``options``: what the layer runs.
    ``reuse``: HyLRA, the ``layer_idx`` whose selection this layer attends over (None: it selects).
    ``store``: HyLRA, the selections of the current forward by ``layer_idx``, shared by a model's layers.
    ``route``: Flux, the sparse branch ``(mechanism, options)``; ``router`` chooses per sequence and
    ``z`` [B] holds its last choice, for :func:`router_loss`.
    ``profile``: set while ``profile_reuse`` runs: mass ratios by ``layer_idx``.
    """

    def __init__(self, mechanism: str, options: dict, *, reuse=None, store=None, route=None, router=None):
        super().__init__()
        self.mechanism, self.options = mechanism, dict(options)
        self.reuse, self.store, self.route, self.router = reuse, store, route, router
        self.z: Tensor | None = None
        self.profile: dict | None = None

    def extra_repr(self) -> str:
        return f"{self.mechanism!r}, {self.options}" + ("" if self.reuse is None else f", reuse={self.reuse}")


def served() -> list[str]:
    """Mechanisms that can stand in for a Hugging Face attention layer: softmax attention over q, k, v
    (linear-family mechanisms change what a layer computes and need their own modules)."""
    return [m.name for m in registry.MECHANISMS if m.drop_in]


def servable(mechanism: str) -> registry.Mechanism:
    """The registry record, if it can stand in for a transformers attention layer."""
    mech = registry.get(mechanism)
    if not mech.drop_in:
        raise ValueError(
            f"{mechanism} is a {mech.kind.value} mechanism and cannot replace a softmax attention layer; "
            f"served: {', '.join(served())}"
        )
    return mech


def set_layer(module: nn.Module, mechanism: str, **options) -> None:
    """Pin one attention module to ``mechanism`` with ``options`` (validated now, not mid-forward)."""
    servable(mechanism).check_option_names(options)
    setattr(module, ATTR, LayerSetting(mechanism, options))


def setting(module: nn.Module) -> LayerSetting | None:
    """The module's pinned setting, or None."""
    return getattr(module, ATTR, None)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules in layer order (transformers tags each with ``layer_idx``)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a layer_idx; attnlab.hf cannot place a policy"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def layer_setting(module: nn.Module, default: str | None) -> tuple[str, dict]:
    """(mechanism, options) for one attention module: its pinned setting, else ``default`` with the
    model config's ``attnlab`` options."""
    pinned = setting(module)
    if pinned is not None:
        return pinned.mechanism, pinned.options
    if default is None:
        raise ValueError(
            "attn_implementation='attnlab_policy' needs every attention layer pinned: apply a policy "
            "(attnlab.hf.apply_policy) or call attnlab.hf.set_layer on each layer"
        )
    return default, dict(getattr(getattr(module, "config", None), "attnlab", None) or {})


def flux_router(module: nn.Module, route: dict | None, old: LayerSetting | None):
    """Flux on a transformers layer: a trainable ``FluxRouter`` choosing, per sequence, between the
    layer's mechanism and ``route``'s sparse one; a router the layer already has is kept."""
    from attnlab.nn.router import FluxRouter

    if route is None:
        return None
    if old is not None and isinstance(old.router, FluxRouter):
        return old.router
    head_dim = getattr(module, "head_dim", None) or module.config.hidden_size // module.config.num_attention_heads
    return FluxRouter(int(head_dim))


def router_loss(model: nn.Module, target: float) -> Tensor:
    """Flux's sparsity loss over the routed layers of the last forward: |1 - mean z - target|."""
    from attnlab.nn.router import sparsity_loss

    pinned = [setting(m) for m in attention_layers(model)]
    zs = [s.z for s in pinned if s is not None and s.z is not None]
    if not zs:
        raise ValueError("no routed layer ran: apply a Policy.router(...) policy and run a forward first")
    return sparsity_loss(zs, target)


def run(module: nn.Module, q, k, v, mask, causal: bool, scale, default: str | None) -> Tensor:
    """One layer's attention under transformers' ``mask``: q [B, H, T, D], k, v [B, Hkv, S, D] ->
    [B, H, T, Dv], by the module's setting (or ``default`` with the config's options)."""
    pinned = setting(module)
    if pinned is not None and pinned.route is not None:
        return _routed(pinned, q, k, v, mask, causal, scale)
    if pinned is not None and pinned.store is not None and registry.get(pinned.mechanism).selects:
        return _selection_sharing(module.layer_idx, pinned, q, k, v, mask, causal, scale)
    name, options = layer_setting(module, default)
    return masked_attention(q, k, v, mask, name, causal=causal, scale=scale, **options)


def _routed(pinned: LayerSetting, q, k, v, mask, causal, scale) -> Tensor:
    """out = z·full + (1 − z)·sparse per sequence; only the chosen branch runs at inference. The
    router reads the queries it is given (after the model's RoPE: transformers rotates before the
    attention function; the paper pools pre-RoPE queries)."""
    from attnlab.nn.router import mix

    z = pinned.router(q)  # [B]
    pinned.z = z
    branches = {True: (pinned.mechanism, pinned.options), False: pinned.route}

    def branch(is_full: bool, rows: Tensor) -> Tensor:
        name, opts = branches[is_full]
        m = None if mask is None else mask[rows] if mask.shape[0] > 1 else mask
        return masked_attention(q[rows], k[rows], v[rows], m, name, causal=causal, scale=scale, **opts)

    return mix(z, pinned.router.training, branch)


def _selection_sharing(layer: int, pinned: LayerSetting, q, k, v, mask, causal, scale) -> Tensor:
    """HyLRA at run time: a computing layer records its selection, a reusing layer attends over its
    source's selection without scoring."""
    if not unpadded(mask, causal, k.shape[2]):
        raise ValueError("layer reuse (HyLRA) runs on unpadded batches: selections are shared across layers per row")
    name, opts = pinned.mechanism, at_length(pinned.options, k.shape[2])
    sel = reuse.shared_selection(pinned.store, layer, pinned.reuse, name, q, k, causal=causal, scale=scale, **opts)
    if pinned.reuse is None and pinned.profile is not None:  # profiling: how much mass needs how many blocks
        weights = _reference.attention(q, k, v, causal=causal, scale=scale).weights
        pinned.profile[layer] = reuse.mass_ratio(weights, sel.layout.block_k)
    return registry.attention(q, k, v, name, causal=causal, scale=scale, selection=sel, **opts)


def pin(module: nn.Module, layer, source: int | None, store: dict) -> None:
    """Pin ``module`` to a policy ``layer`` (``source``: the layer_idx it reuses, if any)."""
    old = setting(module)
    router = flux_router(module, layer.route, old)
    route = None if layer.route is None else (layer.route["mechanism"], dict(layer.route["options"]))
    servable(layer.mechanism).check_option_names(layer.options)
    setattr(
        module,
        ATTR,
        LayerSetting(layer.mechanism, layer.options, reuse=source, store=store, route=route, router=router),
    )

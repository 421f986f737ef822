"""Placing a ``Policy`` on a transformers model, and HyLRA's offline profile (Ai et al., arXiv
2602.00777) that a reuse policy is planned from."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab import registry, reuse
from attnlab.hf import layers
from attnlab.hf.register import POLICY, register, registered


def apply_policy(model: nn.Module, policy) -> nn.Module:
    """Pin each attention layer to the policy's mechanism and switch the model to ``attnlab_policy``.
    Every layer is checked before any is changed, so a bad policy leaves the model as it was."""
    modules = layers.attention_layers(model)
    policy.check(len(modules))
    for layer in policy.layers:  # refuse non-softmax mechanisms before touching the model
        layers.servable(layer.mechanism)
        if layer.route is not None:
            layers.servable(layer.route["mechanism"])
    store: dict = {}  # HyLRA: this model's selections of the current forward, by layer_idx
    for module, layer in zip(modules, policy.layers):
        layers.pin(module, layer, None if layer.reuse is None else modules[layer.reuse].layer_idx, store)
    if not registered(POLICY):
        register()
    model.set_attn_implementation(POLICY)
    return model


def profile_reuse(model: nn.Module, inputs: dict, sparse: str = "block_topk", **options) -> tuple[Tensor, list]:
    """HyLRA's offline profile on calibration ``inputs`` (keyword arguments of ``model``): every layer
    runs ``sparse`` (a selecting mechanism) with ``options``; returns the layers' selection overlap
    T [L, L] and their mass ratios (share of blocks needed for 90% of the attention mass; materializes
    the weights, so keep calibration inputs short). Feed them to ``attnlab.reuse.plan`` and
    ``Policy.reuse``."""
    from attnlab.policy import Policy

    if not registry.get(sparse).selects:
        raise ValueError(f"profile_reuse needs a mechanism that selects its keys, got sparse={sparse!r}")
    modules = layers.attention_layers(model)
    apply_policy(model, Policy.explicit([(sparse, options)] * len(modules)))
    pinned = [layers.setting(m) for m in modules]
    ratios: dict = {}
    for p in pinned:
        p.profile = ratios
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for p in pinned:
            p.profile = None
    selections = [reuse.kept_blocks(p.store[m.layer_idx]) for p, m in zip(pinned, modules)]
    return reuse.overlap(selections), [ratios[m.layer_idx] for m in modules]

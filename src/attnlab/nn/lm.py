"""A small decoder-only language model whose attention layers follow a ``Policy`` (nanoGPT-sized).

    ids [B, T] -> embedding -> n x (x + attn(norm x); x + mlp(norm x)) -> norm -> tied head -> logits

Each layer's attention is ``attnlab.nn.Attention`` with the policy's mechanism and options; Flux
layers (``route``) are ``RoutedAttention``; HyLRA layers (``reuse``) attend over an earlier layer's
selection. Positions: ``"rope"`` everywhere, ``"none"``, or ``"hype"`` (HyPE, MiniCPM-SALA
arXiv 2602.11761 §7.4: RoPE in linear-family layers, none in softmax layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import registry
from attnlab import reuse as reuse_mod
from attnlab.nn.attention import Attention
from attnlab.nn.router import RoutedAttention, sparsity_loss
from attnlab.policy import Layer, Policy


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    dim: int = 128
    n_layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    mlp_ratio: int = 4
    positions: str = "rope"  # "rope" | "none" | "hype"
    sparsity_target: float = 0.5  # Flux layers: the share of sparse choices the router is pulled toward

    def __post_init__(self):
        if self.positions not in ("rope", "none", "hype"):
            raise ValueError(f"positions must be 'rope', 'none' or 'hype', got {self.positions!r}")


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, vocab]
    aux_loss: Tensor  # router sparsity loss (0 when no layer routes); add it to the LM loss


def layer_attention(dim: int, heads: int, kv_heads: int | None, layer: Layer, *, rope: bool) -> nn.Module:
    """The attention module of one policy layer: an ``Attention`` with the layer's mechanism and
    options, wrapped in a ``RoutedAttention`` when the layer routes (Flux)."""
    attn = Attention(dim, heads, kv_heads, layer.mechanism, rope=rope, causal=True, **layer.options)
    return attn if layer.route is None else RoutedAttention(attn, **_route(layer.route))


def attend(attn: nn.Module, h: Tensor, selections: dict, index: int, reuse: int | None) -> tuple[Tensor, Tensor | None]:
    """Run layer ``index``'s attention on h [B, T, dim]: (output, the router's z [B] or None).
    Layers of a selecting mechanism record their selection in ``selections``, or reuse layer
    ``reuse``'s (HyLRA)."""
    if isinstance(attn, RoutedAttention):
        return attn(h)
    if not registry.get(attn.mechanism).selects:
        return attn(h), None
    q, k, v = attn.project(h)
    common = {"causal": attn.causal, "scale": attn.scale}
    sel = reuse_mod.shared_selection(selections, index, reuse, attn.mechanism, q, k, **common, **attn.options)
    out = registry.attention(q, k, v, attn.mechanism, selection=sel, **common, **attn.options)
    return attn.merge_heads(out), None


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: Layer, index: int):
        super().__init__()
        linear = registry.get(layer.mechanism).fixed_state
        rope = cfg.positions == "rope" or (cfg.positions == "hype" and linear)
        self.attn = layer_attention(cfg.dim, cfg.heads, cfg.kv_heads, layer, rope=rope)
        self.reuse, self.index = layer.reuse, index
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        hidden = cfg.mlp_ratio * cfg.dim
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, cfg.dim, bias=False)
        )

    def forward(self, x: Tensor, selections: dict) -> tuple[Tensor, Tensor | None]:
        h, z = attend(self.attn, self.norm1(x), selections, self.index, self.reuse)
        x = x + h
        return x + self.mlp(self.norm2(x)), z


def _route(route: dict) -> dict:
    return {"sparse": route["mechanism"], "sparse_options": route.get("options", {})}


class TransformerLM(nn.Module):
    def __init__(self, config: LMConfig, policy: Policy | None = None):
        super().__init__()
        policy = policy or Policy.explicit(["dense"] * config.n_layers)
        policy.check(config.n_layers)
        self.config, self.policy = config, policy
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, layer, i) for i, layer in enumerate(policy.layers))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: Tensor) -> LMOutput:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"ids must be an integer tensor [B, T], got {getattr(ids, 'shape', ids)!r}")
        x = self.embed(ids)
        selections: dict = {}
        zs = []
        for block in self.blocks:
            x, z = block(x, selections)
            if z is not None:
                zs.append(z)
        aux = sparsity_loss(zs, self.config.sparsity_target) if zs else x.new_zeros(())
        return LMOutput(self.head(self.norm(x)), aux)

    def loss(self, ids: Tensor) -> Tensor:
        """Next-token cross-entropy plus the auxiliary loss."""
        out = self(ids[:, :-1])
        return F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss

"""Layers: the drop-in attention module, the head-structured layers built on attnlab.attention, the
Flux router and a small policy-driven language model."""

from attnlab.nn.attention import Attention
from attnlab.nn.lm import LMConfig, LMOutput, TransformerLM
from attnlab.nn.moh import MoHAttention, MoHOutput, Routing
from attnlab.nn.rope import RotaryEmbedding
from attnlab.nn.router import FluxRouter, RoutedAttention

__all__ = [
    "Attention",
    "FluxRouter",
    "LMConfig",
    "LMOutput",
    "MoHAttention",
    "MoHOutput",
    "RotaryEmbedding",
    "RoutedAttention",
    "Routing",
    "TransformerLM",
]

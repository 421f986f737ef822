"""Layers: the drop-in attention module and the head-structured layers built on attnlab.attention."""

from attnlab.nn.attention import Attention
from attnlab.nn.moh import MoHAttention, MoHOutput, Routing
from attnlab.nn.rope import RotaryEmbedding

__all__ = ["Attention", "MoHAttention", "MoHOutput", "RotaryEmbedding", "Routing"]

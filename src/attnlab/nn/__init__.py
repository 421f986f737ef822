"""Layers: the drop-in attention module, the head-structured layers whose mechanisms need parameters
beyond q, k, v (DESIGN §3.5, §4), the Flux router and a small policy-driven language model."""

from attnlab.nn.attention import Attention
from attnlab.nn.care import CAREBlock, CAREOutput
from attnlab.nn.dha import DecoupledHeadAttention
from attnlab.nn.differential import DifferentialAttention
from attnlab.nn.dual_stream import DualStreamBlock
from attnlab.nn.fixed_pattern import FixedPatternAttention
from attnlab.nn.lm import LMConfig, LMOutput, TransformerLM
from attnlab.nn.moa import MixtureOfAttention
from attnlab.nn.moh import MoHAttention, MoHOutput, Routing
from attnlab.nn.rope import RotaryEmbedding
from attnlab.nn.router import FluxRouter, RoutedAttention

__all__ = [
    "Attention",
    "CAREBlock",
    "CAREOutput",
    "DecoupledHeadAttention",
    "DifferentialAttention",
    "DualStreamBlock",
    "FixedPatternAttention",
    "FluxRouter",
    "LMConfig",
    "LMOutput",
    "MixtureOfAttention",
    "MoHAttention",
    "MoHOutput",
    "RotaryEmbedding",
    "RoutedAttention",
    "Routing",
    "TransformerLM",
]

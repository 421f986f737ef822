"""Layers: the head-structured modules built on attnlab.attention."""

from attnlab.nn.dual_stream import DualStreamBlock
from attnlab.nn.fixed_pattern import FixedPatternAttention
from attnlab.nn.moa import MixtureOfAttention

__all__ = ["DualStreamBlock", "FixedPatternAttention", "MixtureOfAttention"]

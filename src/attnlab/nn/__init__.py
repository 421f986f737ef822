"""Attention layers: modules that own parameters beyond q, k, v (one file per module)."""

from attnlab.nn.differential import DifferentialAttention

__all__ = ["DifferentialAttention"]

"""Attention layers whose mechanisms need parameters beyond q, k, v (DESIGN §3.5, §4)."""

from attnlab.nn.dha import DecoupledHeadAttention

__all__ = ["DecoupledHeadAttention"]

"""Modules that own parameters beyond q, k, v. Their attention cores go through attnlab's mechanisms."""

from attnlab.nn.care import CAREBlock, CAREOutput

__all__ = ["CAREBlock", "CAREOutput"]

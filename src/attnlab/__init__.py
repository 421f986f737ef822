"""attnlab: the attention mechanisms of recent research behind one PyTorch interface.

out = attnlab.attention(q, k, v, "sliding_window", causal=True, window=512)
"""

from attnlab.core import AttentionOutput
from attnlab.policy import Policy
from attnlab.registry import Mechanism, attention, attention_lse, get, mask, mechanisms

__all__ = ["AttentionOutput", "Mechanism", "attention", "attention_lse", "get", "mask", "mechanisms", "Policy"]
__version__ = "0.1.0"

"""attnlab: the attention mechanisms of recent research behind one PyTorch interface.

out = attnlab.attention(q, k, v, "sliding_window", causal=True, window=512)
"""

from attnlab import plot as plot  # pictures of masks; matplotlib is imported only when one is drawn
from attnlab import registry as _registry
from attnlab.core import AttentionOutput
from attnlab.policy import Policy
from attnlab.registry import Mechanism, attention, attention_lse, get, mask


def names() -> list[str]:
    """The registered mechanism names, in registry order (``attnlab list`` shows their records).

    Formerly ``attnlab.mechanisms()``, which still works for one release with a DeprecationWarning:
    ``attnlab.mechanisms`` is the package of mechanism modules (``attnlab.mechanisms.sliding_window``).
    """
    return _registry.mechanisms()


__all__ = ["AttentionOutput", "Mechanism", "attention", "attention_lse", "get", "mask", "names", "Policy"]
__version__ = "0.1.0"

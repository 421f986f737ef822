"""attnlab: the attention mechanisms of recent research behind one PyTorch interface.

out = attnlab.attention(q, k, v, "sliding_window", causal=True, window=512)
"""

import sys
import types
import warnings

from attnlab import mechanisms as _mechanisms
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


class _CallablePackage(types.ModuleType):
    """``attnlab.mechanisms`` for one release: callable, because ``attnlab.mechanisms()`` was the
    names function before the package got its name back. Set from here, above the registry, so the
    package itself imports nothing above ``mechanisms/``."""

    def __call__(self) -> list[str]:
        warnings.warn(
            "attnlab.mechanisms() is deprecated and will be removed in the next release; use attnlab.names()",
            DeprecationWarning,
            stacklevel=2,
        )
        return names()


sys.modules[_mechanisms.__name__].__class__ = _CallablePackage

__all__ = ["AttentionOutput", "Mechanism", "attention", "attention_lse", "get", "mask", "names", "Policy"]
__version__ = "0.1.0"

"""One file per mechanism: its dense mask (for the oracle), its predicate and block layout (for the
executor), and its fast path, ending in its ``SPEC`` record. The registry (``attnlab.registry``) lists
them.

``import attnlab.mechanisms.block_topk as bt`` and ``help(attnlab.mechanisms.sliding_window)`` reach
a mechanism's module, whose docstring names its paper, its exact rule and the ambiguities it resolves
(``attnlab list --doc NAME`` prints it). The names of the registered mechanisms are ``attnlab.names()``.
"""

import importlib
import importlib.util


def __getattr__(name: str):
    # A mechanism module no one has imported yet (``attnlab.mechanisms.care``) is still an attribute.
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

"""One file per mechanism: its dense mask (for the oracle), its predicate and block layout (for the
executor), and its fast path. The registry (``attnlab.registry``) lists them."""

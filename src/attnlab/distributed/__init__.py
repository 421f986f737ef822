"""Context parallelism, part 1: how a sequence of T tokens is split across W ranks.

Pure functions, no process group and no communication yet. A :class:`Sharding` says which token
positions each rank holds; :func:`shard` / :func:`unshard` move a tensor between the full and the
per-rank view; :func:`area` measures how much allowed (query, key) area each rank's queries cover
under a mechanism's mask, so layouts can be compared by :func:`imbalance`. :func:`linear_cp` runs the
linear family over a process group by exchanging fixed-size states (part 4).

The layouts follow two anchors: ring-flash-attention's *zigzag* (rank r holds chunks r and 2W-1-r,
balancing a causal mask) and MagiAttention's area-balanced dispatch (cut the query axis where the
prefix sum of the mask's allowed area crosses equal shares), here :func:`balanced`.
"""

from attnlab.distributed.area import area, balanced, imbalance, row_area
from attnlab.distributed.linear import linear_cp
from attnlab.distributed.sharding import Sharding, contiguous, shard, unshard, zigzag

__all__ = [
    "Sharding",
    "area",
    "balanced",
    "contiguous",
    "imbalance",
    "linear_cp",
    "row_area",
    "shard",
    "unshard",
    "zigzag",
]

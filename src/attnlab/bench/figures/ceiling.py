"""How close to the density-ideal can the block-sparse executor get on CPU? The kernel's own ceiling.

The executor hands PyTorch's fused CPU flash kernel one call per group of query blocks, each block
with its selected keys gathered into a contiguous run. This measures that kernel on *ideal* input —
``tiles`` query blocks of ``rows`` rows, each with ``keys`` pre-gathered contiguous keys, no mask, no
selection, no gathers — and states it as a fraction of the density-ideal speedup over SDPA causal on
the same total work:

    ideal_ms = sdpa_causal_ms * (tiles * rows * keys) / (H * T * T / 2)

A mechanism whose selected blocks must be gathered cannot beat this fraction on this kernel; the
gathers and the selection come on top. Same tiles at larger ``rows`` show what bigger query tiles
would buy. ``python -m attnlab.bench.figures.ceiling [T] [keys]`` prints the table.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn.functional as F

from attnlab.bench.measure import time_interleaved

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def ceiling(
    T: int = 16384, keys: int = 1024, heads: int = 8, dim: int = 64, rows=(64, 128, 256), repeats: int = 3
) -> list[dict]:
    """One row per query-tile height: kernel ms, ideal ms and their ratio (fp32, batch 1). SDPA and
    every tiling are timed in alternation, so machine drift hits them alike."""
    q, k, v = (torch.randn(1, heads, T, dim) for _ in range(3))
    calls = [partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)]
    for r in rows:
        n = heads * T // r  # tiles of r rows cover the same queries
        qt, kt, vt = torch.randn(1, n, r, dim), torch.randn(1, n, keys, dim), torch.randn(1, n, keys, dim)
        calls.append(partial(_flash, qt, kt, vt, 0.0, False, scale=dim**-0.5))
    sdpa, *tiled = (t.median * 1e3 for t in time_interleaved(calls, min_repeats=repeats, max_repeats=repeats))
    ideal = sdpa * (heads * T * keys) / (heads * T * T / 2)  # every query row sees ``keys`` keys
    return [
        {"rows": r, "tiles": heads * T // r, "keys": keys, "sdpa_ms": sdpa, "ideal_ms": ideal, "kernel_ms": ms,
         "of_ideal": ideal / ms}
        for r, ms in zip(rows, tiled)
    ]  # fmt: skip


def main(argv: list[str]) -> None:
    T = int(argv[0]) if argv else 16384
    keys = int(argv[1]) if len(argv) > 1 else 1024
    print(f"fused CPU flash kernel on ideal tiles: T={T}, {keys} keys per query, H8 D64 fp32, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for r in ceiling(T, keys):
        print(f"  {r['rows']:>4}-row tiles x {r['tiles']:>5}: {r['kernel_ms']:8.1f} ms   ideal {r['ideal_ms']:7.1f} ms"
              f"   {r['of_ideal']:.2f} of the density-ideal   (SDPA causal {r['sdpa_ms']:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])

"""Differential attention against dense attention (SDPA) on the same shape, timed interleaved.

Two readings of "the same shape", both B=1, fp32, 2 threads, against dense q, k, v [1, 8, T, 64]:

* ``same``: differential on the very same q, k, v tensors: 8 differential heads, two maps of
  width d = 32 each, values 64 wide. Two softmax maps per head where dense has one.
* ``paper``: the paper's parameter match (DIFF has half the heads of the Transformer it replaces,
  each of twice the width): q, k, v [1, 4, T, 128], i.e. 4 heads, two maps of d = 64, values 128 wide.
  Same number of maps and QK FLOPs as dense; the PV product is twice as wide.

    PYTHONPATH=src python -m attnlab.bench.figures.differential --lengths 4096 16384
"""

from __future__ import annotations

import argparse

import torch

import attnlab
from attnlab.bench.measure import time_interleaved

SHAPES = {"same": (8, 64), "paper": (4, 128)}  # differential (heads, head dim); dense is always (8, 64)


def _call(name: str, q, k, v, causal: bool, backward: bool):
    def run():
        if backward:
            attnlab.attention(q, k, v, name, causal=causal).sum().backward()
        else:
            with torch.no_grad():
                attnlab.attention(q, k, v, name, causal=causal)

    return run


def compare(T: int, causal: bool, reading: str, *, backward: bool = False, repeats: int = 3) -> tuple[float, float]:
    """(dense median s, differential median s), timed a b a b ... after one warm-up call each."""
    g = torch.Generator().manual_seed(T)
    dense = [torch.randn(1, 8, T, 64, generator=g).requires_grad_(backward) for _ in range(3)]
    H, D = SHAPES[reading]
    diff = [torch.randn(1, H, T, D, generator=g).requires_grad_(backward) for _ in range(3)]
    base, ours = time_interleaved(
        [_call("dense", *dense, causal, backward), _call("differential", *diff, causal, backward)],
        min_repeats=repeats,
        max_repeats=repeats,
        budget=0.0,
    )
    return base.median, ours.median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--readings", nargs="+", choices=sorted(SHAPES), default=["same", "paper"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for reading in args.readings:
        for T in args.lengths:
            for causal in (False, True):
                base, ours = compare(T, causal, reading, backward=args.backward, repeats=args.repeats)
                print(
                    f"{reading:5s} T={T:<6d} {'causal' if causal else 'full  '} "
                    f"dense {base * 1e3:8.0f} ms  differential {ours * 1e3:8.0f} ms  ratio {ours / base:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

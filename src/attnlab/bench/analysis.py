"""What the efficiency rows mean: CAB's efficiency length, and run-to-run comparison.

Efficiency length (CAB, Zhang et al., ICML 2023): the sequence length above which a mechanism beats
dense attention. Dense time is fit as a quadratic in T (a T^2 + b T + c, least squares), the
mechanism's time as a line (b' T + c'); the crossing is the smallest T > 0 where the quadratic
exceeds the line. The same for memory, against SDPA's measured peak. Lengths are reported as
``None`` when the curves do not cross (the mechanism never wins, or dense never loses, e.g. SDPA's
flash kernel keeps memory linear too) and flagged when the crossing lies outside the measured range.

Scaling exponent: the least-squares slope of log(time) against log(T) over the measured lengths, so
that a claimed cost law can be checked from the same run (dense attention ~2, a window ~1, span
search's O(L^1.5) ~1.5). Fixed per-call costs pull it below the asymptote at short lengths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Crossing:
    mechanism: str
    causal: bool
    mode: str
    time_T: float | None  # efficiency length in time
    memory_T: float | None  # in memory
    lengths: tuple[int, ...]  # measured lengths the fit used
    exponent: float | None = None  # time ~ T^exponent over ``lengths``

    def in_range(self, T: float | None) -> bool:
        return T is not None and min(self.lengths) <= T <= max(self.lengths)


def _fit(T: list[float], y: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients, highest power first."""
    x = torch.tensor(T, dtype=torch.float64)
    A = torch.stack([x**p for p in range(degree, -1, -1)], 1)
    return torch.linalg.lstsq(A, torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution.flatten().tolist()


def crossing(T: list[float], dense: list[float], ours: list[float]) -> float | None:
    """Smallest T > 0 where the quadratic fit of ``dense`` exceeds the linear fit of ``ours``."""
    if len(T) < 2:
        return None
    a, b, c = _fit(T, dense, 2) if len(T) >= 3 else (0.0, *_fit(T, dense, 1))
    b2, c2 = _fit(T, ours, 1)
    A, B, C = a, b - b2, c - c2  # dense - ours = A T^2 + B T + C
    if abs(A) * max(T) ** 2 < 1e-9 * max(map(abs, dense)):  # no measurable quadratic term: fit noise
        A = 0.0
    if A == 0.0:
        roots = [-C / B] if abs(B) > 1e-30 else []
    else:
        disc = B * B - 4 * A * C
        roots = [] if disc < 0 else [(-B - math.sqrt(disc)) / (2 * A), (-B + math.sqrt(disc)) / (2 * A)]
    for r in sorted(x for x in roots if x > 0):
        probe = r * 1.01 + 1
        if A * probe * probe + B * probe + C > 0:  # dense really is the slower one past the root
            return r
    m = max(T)  # no crossing on T > 0: one sign throughout; positive = the mechanism always wins
    return 0.0 if A * m * m + B * m + C > 0 else None


def scaling_exponent(T: list[float], t: list[float]) -> float | None:
    """Slope of the least-squares line through (log T, log t); None below two lengths."""
    if len({*T}) < 2 or min(t) <= 0:
        return None
    slope, _ = _fit([math.log(x) for x in T], [math.log(y) for y in t], 1)
    return slope


def efficiency_lengths(rows: list[dict]) -> list[Crossing]:
    """One crossing per (mechanism, mask, mode) with at least two timed lengths."""
    groups: dict = {}
    for r in rows:
        if r.get("median_ms") is None or r.get("vs_sdpa") is None or r.get("baseline"):
            continue  # untimed, or SDPA itself (no crossing with itself)
        groups.setdefault((r.get("pattern") or r["mechanism"], r["causal"], r["mode"]), []).append(r)
    out = []
    for (name, causal, mode), rs in groups.items():
        if len({r["T"] for r in rs}) < 2:
            continue  # a fit needs two lengths
        rs.sort(key=lambda r: r["T"])
        T = [float(r["T"]) for r in rs]
        ours = [r["median_ms"] for r in rs]
        dense = [r["median_ms"] * r["vs_sdpa"] for r in rs]
        mem = [(r.get("sdpa_peak_mib"), r.get("peak_mib")) for r in rs]
        mem_T = None
        if all(a is not None and b is not None for a, b in mem):
            mem_T = crossing(T, [a for a, _ in mem], [b for _, b in mem])
        lengths = tuple(int(t) for t in T)
        out.append(Crossing(name, causal, mode, crossing(T, dense, ours), mem_T, lengths, scaling_exponent(T, ours)))
    return out


def run_file(path: str | Path) -> tuple[Path, bool]:
    """The results.json a path names: the file, its run folder, or the newest run under a folder given
    to ``--out`` (run folders are named by timestamp, so the newest sorts last). Returns the file and
    whether it was picked among several runs."""
    p = Path(path)
    if p.is_file():
        return p, False
    if (p / "results.json").is_file():
        return p / "results.json", False
    runs = sorted(d / "results.json" for d in p.iterdir() if (d / "results.json").is_file()) if p.is_dir() else []
    if not runs:
        raise ValueError(f"no results.json at {path} or in a run folder under it")
    return runs[-1], True


def load(path: str | Path) -> dict:
    """A run's results.json, given the file, its folder, or the ``--out`` folder (its newest run)."""
    return json.loads(run_file(path)[0].read_text())


def compare(a: dict, b: dict, threshold: float = 0.10) -> list[dict]:
    """Rows present in both runs, matched on (mechanism, T, mask, mode, options): time ratio B/A (>1 =
    B slower) and the change of the speedup over SDPA, which cancels machine drift between runs."""
    key = lambda r: (r["mechanism"], r["T"], r["causal"], r["mode"], r["options"])  # noqa: E731
    base = {key(r): r for r in a["rows"] if r.get("median_ms")}
    out = []
    for r in b["rows"]:
        old = base.get(key(r))
        if old is None or not r.get("median_ms"):
            continue
        ratio = r["median_ms"] / old["median_ms"]
        sp = r["vs_sdpa"] / old["vs_sdpa"] if r.get("vs_sdpa") and old.get("vs_sdpa") else None
        regressed = sp is not None and sp < 1 - threshold
        out.append(
            {
                "mechanism": r["mechanism"],
                "T": r["T"],
                "causal": r["causal"],
                "mode": r["mode"],
                "time_ratio": ratio,
                "speedup_ratio": sp,
                "regressed": regressed,
            }
        )
    return out

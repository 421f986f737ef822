"""Timing and memory probes: medians over repeats after warm-up, and peak memory measured while a call
runs (a real probe, not an estimate): on CPU the peak of the bytes PyTorch's allocator holds for the
call's tensors (from the profiler's memory events), on CUDA the caching allocator's peak.

The resident set size, which the CPU probe used before, misses most of it: the C allocator serves a
call's tensors from pages an earlier call left resident, so small runs read 0 or a page or two.

On CUDA a call is timed with CUDA events recorded around it (kernel launches are asynchronous, so a
host clock would time the launch, not the work); on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: ``peak`` = highest resident set size above the starting one, in bytes.

    Sampled every ``interval`` seconds on a thread; large tensors live for far longer than that.
    On systems without /proc it reports None.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval, self.peak = interval, None
        self._stop = threading.Event()

    def __enter__(self):
        try:
            self._base = _rss_bytes()
        except OSError:
            return self
        self._max = self._base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self._base


@dataclass
class Timing:
    median: float  # seconds
    spread: float  # (max - min) / median over the repeats
    repeats: int
    first: float  # the cold first call: includes building and caching the layout


def elapsed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes on ``device``."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)  # nothing queued before the call counts against it
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class PeakCUDA:
    """Context manager: ``peak`` = the CUDA caching allocator's highest allocation above the starting
    one, in bytes (what the call itself needed, not what was already resident)."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device, self.peak = torch.device(device), None

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self._base


class PeakCPU:
    """Context manager: ``peak`` = the highest number of bytes the call's CPU tensors held at once,
    above what was live before it. The profiler books an allocation on the op that made it and a free
    as a ``[memory]`` event; a running sum in start order peaks where the call needed the most."""

    def __init__(self):
        self.peak = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        live = peak = 0
        for event in sorted(self._prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        self.peak = peak


def peak_memory(device: torch.device | str = "cpu"):
    """The memory probe for ``device``: :class:`PeakCUDA` on CUDA, :class:`PeakCPU` elsewhere."""
    return PeakCUDA(device) if torch.device(device).type == "cuda" else PeakCPU()


def _summary(times: list[float], first: float) -> Timing:
    med = statistics.median(times)
    return Timing(med, (max(times) - min(times)) / med if med else 0.0, len(times), first)


def time_call(
    fn: Callable[[], object], *, min_repeats: int = 3, max_repeats: int = 10, budget: float = 3.0, device="cpu"
) -> Timing:
    """One cold call (also the warm-up), then repeats until ``budget`` seconds or ``max_repeats``."""
    return time_interleaved([fn], min_repeats=min_repeats, max_repeats=max_repeats, budget=budget, device=device)[0]


def time_interleaved(
    fns: list[Callable[[], object]],
    *,
    min_repeats: int = 3,
    max_repeats: int = 10,
    budget: float = 3.0,
    device: torch.device | str = "cpu",
) -> list[Timing]:
    """Time several calls in alternation, ``a b a b ...``, so that machine drift (other load,
    frequency changes) hits all of them alike and their ratio stays honest on a shared box."""
    firsts = [elapsed(fn, device) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < min_repeats or (len(times[0]) < max_repeats and sum(map(sum, times)) < budget):
        for fn, ts in zip(fns, times):
            ts.append(elapsed(fn, device))
    return [_summary(ts, f) for ts, f in zip(times, firsts)]

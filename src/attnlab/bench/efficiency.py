"""The efficiency suite: every mechanism x length x causal x {fwd, fwd+bwd}, against raw SDPA (and
compiled FlexAttention with the same mask, forward) measured in the same run.

FLOP rule: forward = 4 * B * H * D * (allowed query-key pairs), counting the QK^T and PV matmuls at
2 FLOPs per multiply-add over the masked area only (sparsity-adjusted). Forward+backward = 3.5x
forward (the FlashAttention convention: backward = 2.5x forward). Speedups are baseline time / our
time in the same process, the same inputs, the same thread count.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attnlab import registry
from attnlab.bench.measure import PeakRSS, Timing, time_call
from attnlab.testing import check_mechanism

PRESETS = {
    "quick": {"lengths": (1024, 4096, 16384), "budget": 2.0},
    "full": {"lengths": (1024, 4096, 16384, 65536), "budget": 6.0},
}
# A configuration whose estimated time exceeds this many seconds is skipped (and reported as such).
CONFIG_CAP_S = {"quick": 25.0, "full": 240.0}


@dataclass
class Row:
    mechanism: str
    impl: str
    T: int
    causal: bool
    mode: str
    options: str
    median_ms: float | None = None
    spread: float | None = None
    repeats: int = 0
    density: float | None = None
    gflops: float | None = None
    vs_sdpa: float | None = None
    vs_flex: float | None = None
    ideal_vs_sdpa: float | None = None
    peak_mib: float | None = None
    peak_vs_qkv: float | None = None
    build_ms: float | None = None  # building the block layout, once per (T, mask); cached after
    note: str = ""


def _grid(T: int) -> tuple[int, int]:
    a = 2 ** (int(math.log2(T)) // 2)
    return a, T // a


def _doc_lengths(T: int, seed: int = 0) -> tuple[int, ...]:
    """A realistic packed-batch mix: log-normal document lengths around T/8, seeded."""
    rng = random.Random(seed)
    out, left = [], T
    while left > 0:
        n = min(left, max(16, int(rng.lognormvariate(math.log(T / 8), 0.8))))
        out.append(n)
        left -= n
    return tuple(out)


def bench_options(name: str, T: int) -> dict:
    """The configuration each mechanism is benchmarked with at length T (registry defaults where
    they make sense at any length)."""
    if name == "neighborhood":
        return {"shape": _grid(T), "kernel_size": 13}
    if name == "halo":
        return {"shape": _grid(T), "block_size": 8, "halo": 3}
    if name == "document":
        return {"lengths": _doc_lengths(T)}
    if name == "prefix_lm":
        return {"prefix": T // 4}
    if name == "streaming":
        return {"sinks": 64, "window": 512}
    return dict(registry.get(name).defaults)


def gate(names: list[str]) -> dict[str, list[str]]:
    """The correctness gate: the contract on small shapes, forward and gradients, fp32 and fp64."""
    return {n: check_mechanism(n, dtypes=(torch.float32, torch.float64)) for n in names}


def _inputs(T: int, B: int, H: int, Hkv: int, D: int, dtype, grad: bool):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v


def _call(fn, q, k, v, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            return lambda: fn(q, k, v)

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    return step


def _measure(fn, q, k, v, mode: str, budget: float) -> tuple[Timing, int | None]:
    step = _call(fn, q, k, v, mode)
    timing = time_call(step, budget=budget)
    with PeakRSS() as probe:
        step()
    return timing, probe.peak


class Baselines:
    """SDPA and Flex timings, measured once per (T, causal, mode) and shared by every mechanism."""

    def __init__(self, shape, dtype, budget, flex_names=()):
        self.shape, self.dtype, self.budget, self.cache = shape, dtype, budget, {}
        self.flex_names = tuple(flex_names)

    def sdpa(self, T: int, causal: bool, mode: str) -> Timing:
        key = ("sdpa", T, causal, mode)
        if key not in self.cache:
            B, H, Hkv, D = self.shape
            q, k, v = _inputs(T, B, H, Hkv, D, self.dtype, mode != "fwd")

            def fn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv)

            self.cache[key] = _measure(fn, q, k, v, mode, self.budget)[0]
        return self.cache[key]

    def flex(self, name: str, T: int, causal: bool, opts: dict) -> Timing | str:
        """Compiled FlexAttention forward under the same predicate, or the reason it can't run."""
        key = ("flex", name, T, causal)
        if key not in self.cache:
            try:
                from attnlab.kernels.flex import block_mask, flex_forward

                B, H, Hkv, D = self.shape
                q, k, v = _inputs(T, B, H, Hkv, D, self.dtype, False)
                lay = registry.get(name).block_layout(T, T, causal=causal, kv_heads=Hkv, **opts)
                mask = block_mask(lay, B, H, q.device)
                self.cache[key] = time_call(lambda: flex_forward(q, k, v, mask, D**-0.5), budget=self.budget)
            except Exception as e:  # torch.compile needs a working C++ toolchain; say why it is absent
                self.cache[key] = f"flex unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return self.cache[key]


def run(
    names: list[str] | None = None,
    *,
    preset: str = "quick",
    lengths: tuple[int, ...] | None = None,
    modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    shape: tuple[int, int, int, int] = (1, 8, 8, 64),
    dtype: torch.dtype = torch.float32,
    flex: tuple[str, ...] = ("sliding_window",),
    causal: tuple[bool, ...] = (False, True),
    progress=None,
) -> tuple[list[Row], dict[str, list[str]]]:
    """Gate, then time. Returns the rows and the gate failures (mechanisms that failed get no speed)."""
    names = names or registry.mechanisms()
    cfg = PRESETS[preset]
    lengths = lengths or cfg["lengths"]
    failures = gate(names)
    base = Baselines(shape, dtype, cfg["budget"], flex)
    B, H, Hkv, D = shape
    plan = []
    for name in names:
        mech = registry.get(name)
        for T in lengths:
            for c in causal:
                if registry.pattern(T, T, c) in mech.patterns:
                    plan += [(name, T, c, mode) for mode in modes]
    rows = []
    task = progress.add_task("benchmarking", total=len(plan)) if progress else None
    for name, T, causal, mode in plan:
        mech = registry.get(name)
        opts = bench_options(name, T)
        row = Row(name, "auto", T, causal, mode, ", ".join(f"{k}={_short(v)}" for k, v in opts.items()))
        rows.append(row)
        if progress:
            progress.update(task, description=f"{name} T={T} {'causal' if causal else 'full'} {mode}")
        if failures[name]:
            row.note = f"FAILED correctness gate ({len(failures[name])} cases); speed not reported"
        else:
            _bench_row(row, mech, opts, base, preset)
        if progress:
            progress.advance(task)
    return rows, failures


def _short(v) -> str:
    if isinstance(v, tuple) and len(v) > 4:
        return f"<{len(v)} docs>"
    return str(v)


def _bench_row(row: Row, mech, opts: dict, base: Baselines, preset: str) -> None:
    B, H, Hkv, D = base.shape
    T, causal, mode = row.T, row.causal, row.mode
    t0 = time.perf_counter()
    # dense runs on SDPA; its density is analytic and it needs no layout
    has_layout = mech.layout is not None and mech.name != "dense"
    lay = mech.block_layout(T, T, causal=causal, kv_heads=Hkv, **opts) if has_layout else None
    build = base.cache.setdefault(("build", mech.name, T, causal), time.perf_counter() - t0)  # first (cold) build
    allowed = lay.allowed_count() if lay is not None else (T * (T + 1) // 2 if causal else T * T)
    row.density = allowed / (T * T)
    sdpa = base.sdpa(T, causal, "fwd")
    factor = 3.5 if mode != "fwd" else 1.0
    estimate = sdpa.median * max(row.density / (0.5 if causal else 1.0), 0.05) * factor * 5
    if estimate > CONFIG_CAP_S[preset]:
        row.note = f"skipped: estimated {estimate:.0f}s exceeds the {preset} preset's per-config cap"
        return
    sdpa = base.sdpa(T, causal, mode)
    q, k, v = _inputs(T, B, H, Hkv, D, base.dtype, mode != "fwd")

    def fn(q, k, v):
        return registry.attention(q, k, v, mech.name, causal=causal, **opts)

    timing, peak = _measure(fn, q, k, v, mode, base.budget)
    row.median_ms, row.spread, row.repeats = timing.median * 1e3, timing.spread, timing.repeats
    row.build_ms = build * 1e3 if lay is not None else None
    row.gflops = 4 * B * H * D * allowed * factor / timing.median / 1e9
    row.vs_sdpa = sdpa.median / timing.median
    sdpa_area = T * (T + 1) / 2 if causal else T * T
    row.ideal_vs_sdpa = sdpa_area / allowed if allowed else None
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    if peak is not None:
        row.peak_mib, row.peak_vs_qkv = peak / 2**20, peak / qkv_bytes
    if mode == "fwd" and mech.name in base.flex_names:
        flex = base.flex(mech.name, T, causal, opts)
        if isinstance(flex, str):
            row.note = flex
        else:
            row.vs_flex = flex.median / timing.median


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]

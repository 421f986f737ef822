"""The efficiency suite: every mechanism x length x causal x {fwd, fwd+bwd}, against raw SDPA, compiled
FlexAttention under the same mask and, for the linear family, flash-linear-attention, measured in the
same run (bench/baselines.py). On CUDA every mask mechanism gets the Flex baseline by default; on the
CPU, where compiling is slow and serves the forward only, it is opt-in.

A mechanism that raises is recorded as a row with its error (``status="error"``) and the run goes on;
so is one that fails the correctness gate (no speed is reported for it). Each timed row reports its
first call (layout + BlockMask + compile + the call) apart from the steady-state median.

FLOP rule: forward = 4 * B * H * D * (allowed query-key pairs), counting the QK^T and PV matmuls at
2 FLOPs per multiply-add over the masked area only (sparsity-adjusted). Forward+backward = 3.5x
forward (the FlashAttention convention: backward = 2.5x forward). Speedups are baseline time / our
time in the same process, the same inputs, the same thread count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attnlab import registry
from attnlab.bench import baselines
from attnlab.bench.measure import elapsed, peak_memory, time_interleaved
from attnlab.bench.workloads import PATTERNS, bench_options, is_sdpa_baseline
from attnlab.testing import check_mechanism

FLOP_RULE = (
    "GFLOP/s counts 4·B·H·D FLOPs per allowed (query, key) pair (QKᵀ and PV, 2 per multiply-add) over the "
    "masked area only; forward+backward counts 3.5× forward"
)

PRESETS = {
    # quick: every mechanism at two lengths in about 5 minutes on 2 cores; 16K and 64K live in full
    "quick": {"lengths": (1024, 4096), "budget": 1.0},
    "full": {"lengths": (1024, 4096, 16384, 65536), "budget": 6.0},
}
# A configuration whose estimated time exceeds this many seconds is skipped (and reported as such).
CONFIG_CAP_S = {"quick": 12.0, "full": 300.0}
# Rough FLOP/s of (SDPA, our paths) per device type, for that estimate only: the 2-core CPU this suite
# was sized on, and a conservative fraction of an H100/H200 in fp32.
RATES = {"cpu": (1.2e11, 6e10), "cuda": (3e13, 1e13)}
# Linear attention has no T x S area: no density, and its cost grows with T (about a 2 x 64-token
# chunk's worth of pairs per query), not with the SDPA area the skip estimate otherwise assumes.
LINEAR_PAIRS_PER_QUERY = 128


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
    sdpa_peak_mib: float | None = None  # SDPA's peak on the same inputs (for memory efficiency lengths)
    build_ms: float | None = None  # building the block layout, once per (T, mask); cached after
    first_ms: float | None = None  # our first call: layout + plan / BlockMask + compile + the call
    flex_ms: float | None = None  # compiled Flex, same mask, steady-state median
    flex_first_ms: float | None = None  # Flex's BlockMask + compile + first call
    fla_ms: float | None = None  # flash-linear-attention's chunk kernel (linear family, CUDA)
    fla_first_ms: float | None = None
    vs_fla: float | None = None
    status: str = "ok"  # ok | skipped | error
    error: str = ""  # why the row has no speed: the exception, or the correctness gate's first failure
    note: str = ""
    pattern: str = ""  # the LongCA-bench mask pattern this row times (pattern sweep), else empty
    baseline: bool = False  # the mechanism's fast path is SDPA itself (workloads.is_sdpa_baseline)


def gate(names: list[str], device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """The correctness gate: the contract on small shapes, forward and gradients, on ``device``:
    fp32 and fp64 on the CPU, fp32 on CUDA."""
    dtypes = (torch.float32, torch.float64) if torch.device(device).type == "cpu" else (torch.float32,)
    return {n: check_mechanism(n, dtypes=dtypes, device=device) for n in names}


def flex_default(device: torch.device | str) -> tuple[str, ...]:
    """Mechanisms timed against compiled Flex unless asked otherwise: every mask mechanism on CUDA
    (``("all",)``), none on the CPU, where each compile costs more than a quick run's budget."""
    return ("all",) if torch.device(device).type == "cuda" else ()


def _flex_layout(mech, lay, T: int, causal: bool, Hkv: int, opts: dict):
    """The layout Flex is handed for a row, or None when the mechanism is not one softmax under a mask
    (composites with their own oracle)."""
    if mech.oracle is not None:
        return None
    if lay is None and mech.layout is not None:
        lay = mech.block_layout(T, T, causal=causal, kv_heads=Hkv, **opts)
    return lay


def _inputs(T: int, B: int, H: int, Hkv: int, D: int, dtype, grad: bool, device="cpu"):
    g = torch.Generator().manual_seed(T)  # drawn on the CPU: the same inputs on every device
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype).requires_grad_(grad)
    return q, k, v


def _call(fn, q, k, v, mode: str):
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        return forward

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    return step


def _sdpa(causal: bool, gqa: bool):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def run(
    names: list[str] | None = None,
    *,
    preset: str = "quick",
    lengths: tuple[int, ...] | None = None,
    modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    shape: tuple[int, int, int, int] = (1, 8, 8, 64),
    dtype: torch.dtype = torch.float32,
    flex: tuple[str, ...] | None = None,
    causal: tuple[bool, ...] = (False, True),
    patterns: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    gate_device: torch.device | str | None = None,
    progress=None,
) -> tuple[list[Row], dict[str, list[str]]]:
    """Gate, then time every mechanism (``names``; [] for none) and every LongCA-bench mask pattern in
    ``patterns`` on ``device``. ``flex``: mechanism names to time against compiled Flex, ``("all",)``
    for every mask mechanism, None for the device's default. The gate runs the contract on
    ``gate_device`` (default: ``device``). Returns the rows, errors included, and the gate failures
    (mechanisms that failed get no speed)."""
    device = torch.device(device)
    names = registry.mechanisms() if names is None else list(names)
    cfg = PRESETS[preset]
    lengths = lengths or cfg["lengths"]
    try:
        failures = gate(list(dict.fromkeys(names + [PATTERNS[p][0] for p in patterns])), gate_device or device)
    except KeyboardInterrupt:
        raise Interrupted([], {}, "interrupted in the correctness gate, before any row") from None
    ctx = {
        "shape": shape,
        "dtype": dtype,
        "budget": cfg["budget"],
        "preset": preset,
        "flex": flex_default(device) if flex is None else tuple(flex),
        # the CPU compiles Flex once per length: only at the longest in quick; CUDA at every length
        "flex_lengths": lengths if preset == "full" or device.type == "cuda" else (max(lengths),),
        "fla": baselines.fla_status(device),
        "device": device,
    }
    plan = []  # (pattern label, mechanism, T, causal, mode, options at T)
    for name in names:
        mech = registry.get(name)
        for T in lengths:
            for c in causal:
                if registry.pattern(T, T, c) in mech.patterns:
                    plan += [("", name, T, c, mode, bench_options) for mode in modes]
    for label in patterns:
        name, opts_at, c = PATTERNS[label]
        plan += [(label, name, T, c, mode, lambda _, T, f=opts_at: f(T)) for T in lengths for mode in modes]
    rows = []
    task = progress.add_task("benchmarking", total=len(plan)) if progress else None
    try:
        for label, name, T, causal, mode, options_at in plan:
            mech = registry.get(name)
            if progress:
                what = label or f"{name} {'causal' if causal else 'full'}"
                progress.update(task, description=f"{what} T={T} {mode}")
            rows.append(_row(label, mech, T, causal, mode, options_at, failures[name], ctx))
            if progress:
                progress.advance(task)
    except KeyboardInterrupt:
        raise Interrupted(rows, failures, f"interrupted after {len(rows)} of {len(plan)} rows") from None
    return rows, failures


class Interrupted(Exception):
    """Ctrl-C (or ``timeout -s INT``) during a run: the rows finished so far, so they can be written."""

    def __init__(self, rows: list[Row], failures: dict, message: str):
        super().__init__(message)
        self.rows, self.failures = rows, failures


def _row(label: str, mech, T: int, causal: bool, mode: str, options_at, failed: list[str], ctx: dict) -> Row:
    """One configuration, whatever happens: timed, skipped, or an error row naming the exception."""
    row = Row(mech.name, "auto", T, causal, mode, "", pattern=label, baseline=is_sdpa_baseline(mech))
    if failed:
        row.status, row.error = "error", f"failed the correctness gate ({len(failed)} cases): {failed[0]}"
        return row
    try:
        opts = options_at(mech.name, T)
        row.options = ", ".join(f"{k}={_short(v)}" for k, v in opts.items())
        _bench_row(row, mech, opts, ctx)
    except Exception as e:  # a mechanism that raises is a row, not the end of the run
        kept = {"options": row.options, "density": row.density, "build_ms": row.build_ms}
        row = Row(mech.name, "auto", T, causal, mode, **kept, pattern=label, baseline=row.baseline)
        row.status, row.error = "error", baselines.one_line(e)
        if ctx["device"].type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory row must not starve the next one
    return row


def _short(v) -> str:
    """An option's value as the table and plots show it: a tensor by its shape, a long sequence by its
    ends and length (a packed-document ``lengths`` has hundreds of entries); the JSON keeps this too."""
    if isinstance(v, torch.Tensor):
        return str(v.item()) if v.dim() == 0 else f"tensor[{'x'.join(map(str, v.shape))}]"
    if isinstance(v, (tuple, list)) and len(v) > 4:
        return f"({_short(v[0])}, {_short(v[1])}, …, {_short(v[-1])}; n={len(v)})"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(map(_short, v)) + ")"
    return str(v)


def _bench_row(row: Row, mech, opts: dict, ctx: dict) -> None:
    B, H, Hkv, D = ctx["shape"]
    T, causal, mode = row.T, row.causal, row.mode
    has_layout = mech.layout is not None and not is_sdpa_baseline(mech)  # SDPA itself runs no layout
    device = ctx["device"]
    wants_flex = _wants_flex(row, mech, ctx)
    if device.type == "cuda" or wants_flex:
        # Every row compiles from scratch: its first call then includes its own compile, and the
        # compiled cache never reaches dynamo's recompile limit (past it Flex would run uncompiled).
        torch._dynamo.reset()
    q, k, v = _inputs(T, B, H, Hkv, D, ctx["dtype"], mode != "fwd", device)
    lay = None

    def build():
        nonlocal lay
        if mech.select is not None:  # data-dependent: the layout of this input's selection
            lay = mech.select(q, k, causal=causal, **opts).layout
        elif has_layout:
            lay = mech.block_layout(T, T, causal=causal, kv_heads=Hkv, **opts)

    build_s = elapsed(build, device)
    row.build_ms = build_s * 1e3 if lay is not None else None  # first build (cached after)
    sdpa_area = T * (T + 1) / 2 if causal else T * T
    # allowed (q, k) pairs per head, averaged over the layout's batch / kv-head slices; a composite
    # without one layout (a gated mixture of branches) has no single density
    composite = mech.oracle is not None and lay is None
    allowed = lay.allowed_count() / math.prod(lay.kv_blocks.shape[:2]) if lay is not None else sdpa_area
    row.density = None if composite else allowed / (T * T)
    factor = 3.5 if mode != "fwd" else 1.0
    # Skip what would not fit the preset: cold call + 3 repeats of both paths, at rough device rates.
    work = T * LINEAR_PAIRS_PER_QUERY if mech.fixed_state else allowed
    sdpa_rate, our_rate = RATES.get(device.type, RATES["cpu"])
    estimate = 4 * factor * 4 * B * H * D * (sdpa_area / sdpa_rate + work / our_rate)
    cap = CONFIG_CAP_S[ctx["preset"]]
    if estimate > cap:
        row.status, row.note = "skipped", f"estimated {estimate:.0f}s exceeds the {ctx['preset']} preset's cap"
        return

    def fn(q, k, v):
        return registry.attention(q, k, v, mech.name, causal=causal, **opts)

    ours = _call(fn, q, k, v, mode)
    cold = elapsed(ours, device)  # cold call: builds and caches the layout; a measured guard for slow paths
    row.first_ms = (build_s + cold) * 1e3
    # On CUDA the cold call is mostly compiling: a second call says how slow the path really is.
    warm = elapsed(ours, device) if device.type == "cuda" and 4 * cold > cap else cold
    if 4 * warm > cap:
        row.status, row.note = "skipped", f"one call took {warm:.1f}s, over the {ctx['preset']} preset's cap"
        return
    # Large configurations (> 1 s a call pair) take the median of two repeats, small ones of >= 3.
    repeats = 2 if estimate / 4 > 1.0 else 3
    base, timing = time_interleaved(
        [_call(_sdpa(causal, H != Hkv), q, k, v, mode), ours], budget=ctx["budget"], min_repeats=repeats, device=device
    )
    with peak_memory(device) as probe:
        ours()
    with peak_memory(device) as base_probe:
        _call(_sdpa(causal, H != Hkv), q, k, v, mode)()
    if base_probe.peak is not None:
        row.sdpa_peak_mib = base_probe.peak / 2**20
    row.median_ms, row.spread, row.repeats = timing.median * 1e3, timing.spread, timing.repeats
    row.vs_sdpa = base.median / timing.median
    if not composite:
        row.gflops = 4 * B * H * D * allowed * factor / timing.median / 1e9
        row.ideal_vs_sdpa = sdpa_area / allowed if allowed else None
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    if probe.peak is not None:
        row.peak_mib, row.peak_vs_qkv = probe.peak / 2**20, probe.peak / qkv_bytes
    if wants_flex:
        layout = _flex_layout(mech, lay, T, causal, Hkv, opts)
        _versus(row, "flex", lambda: baselines.flex_baseline(layout, q, k, v, mode), ours, ctx)
    if baselines.has_fla_bridge(mech) and ctx["fla"] is None:
        _versus(row, "fla", lambda: baselines.fla_baseline(mech.name, opts, causal, q, k, v, mode, fn), ours, ctx)


def _wants_flex(row: Row, mech, ctx: dict) -> bool:
    """Whether this row gets the Flex baseline: asked for (by name or "all"), at a Flex length, and a
    mask the baseline can state (a layout mechanism, or any pattern of the sweep)."""
    asked = "all" in ctx["flex"] or mech.name in ctx["flex"]
    maskable = mech.oracle is None and (mech.layout is not None or mech.select is not None)
    not_sdpa = not is_sdpa_baseline(mech) or bool(row.pattern)  # SDPA itself: Flex only as a pattern
    return asked and maskable and not_sdpa and row.T in ctx["flex_lengths"]


def _versus(row: Row, name: str, make_baseline, ours, ctx: dict) -> None:
    """Time a baseline interleaved with our call; record its median, first call and our speedup, or,
    when the baseline cannot run here, why not in the row's note."""
    try:
        baseline = make_baseline()
    except baselines.BaselineUnavailable as e:
        row.note = "; ".join(filter(None, (row.note, str(e))))
        return
    theirs, again = time_interleaved([baseline.step, ours], budget=ctx["budget"], device=ctx["device"])
    setattr(row, f"{name}_ms", theirs.median * 1e3)
    setattr(row, f"{name}_first_ms", baseline.first_s * 1e3)
    setattr(row, f"vs_{name}", theirs.median / again.median)
    if baseline.note:
        row.note = "; ".join(filter(None, (row.note, baseline.note)))


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]

"""attnlab command line: ``list``, ``check`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from attnlab import registry
from attnlab.bench.patterns import PATTERNS
from attnlab.bench.quality.policies import POLICIES


def cmd_list(args) -> int:
    for m in registry.MECHANISMS:
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"
        patterns = ", ".join(p for p in registry.PATTERNS if p in m.patterns)
        print(f"{m.name}\n  impls:    auto, reference, {', '.join(m.impls)}\n  patterns: {patterns}")
        print(f"  defaults: {defaults}\n  paper:    {m.paper}")
    return 0


NO_CUDA = "--device cuda was asked for, but this torch build sees no CUDA device"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def _check_dtypes(args, device: torch.device) -> tuple[torch.dtype, ...]:
    from attnlab.testing import DEVICE_DTYPES

    return tuple(DTYPES[d] for d in args.dtypes) if args.dtypes else DEVICE_DTYPES[device.type]


def _check_summary(reports, dtypes) -> None:
    """One row per mechanism: cases run, failing cases per dtype, seconds."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    head = " ".join(f"{n:>8}" for n in names)
    print(f"\n{'mechanism':22} {'result':6} {'cases':>5} {'failed':>6} {head}  secs")
    for r in reports:
        per = [r.failed_cases(d) for d in dtypes]
        cells = " ".join(f"{'ok' if not n else f'{n} fail':>8}" for n in per)
        result = "PASS" if r.passed else "FAIL"
        print(f"{r.name:22} {result:6} {r.cases:>5} {r.failed_cases():>6} {cells}  {r.seconds:4.0f}")


def cmd_check(args) -> int:
    """The contract for every asked mechanism on one device; a failure never stops the run.
    Exit 0 when all pass, 1 when any fails, 2 on bad input (before any work), 130 when interrupted."""
    from attnlab.testing import run_contract

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"attnlab check: error: {NO_CUDA}", file=sys.stderr)
        return 2
    device = _device(args)
    dtypes = _check_dtypes(args, device)
    names = list(dict.fromkeys(args.names + (args.mechanisms or []))) or registry.mechanisms()
    shown = " ".join(str(d).removeprefix("torch.") for d in dtypes)
    print(f"contract on {device} ({shown}), {len(names)} mechanism(s): forward, LSE and gradients vs the oracle")
    reports = []
    try:
        for name in names:
            r = run_contract(name, dtypes, device)
            reports.append(r)
            if r.passed:
                print(f"PASS  {name}  ({r.cases} cases, {r.seconds:.1f} s)", flush=True)
            else:
                lines = r.lines()
                print(f"FAIL  {name}  ({r.failed_cases()}/{r.cases} cases failed) first: {lines[0]}", flush=True)
                for line in lines[1 : None if args.verbose else 0]:
                    print(f"      {line}")
    except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: still summarize what was checked
        print(f"interrupted during {names[len(reports)]}; {len(names) - len(reports)} mechanism(s) not checked")
    _check_summary(reports, dtypes)
    failed = sum(not r.passed for r in reports)
    print(f"{len(reports) - failed} passed, {failed} failed" + ("" if len(reports) == len(names) else " (partial)"))
    return 130 if len(reports) < len(names) else 1 if failed else 0


def cmd_compare(a: str, b: str) -> int:
    from attnlab.bench import analysis

    try:
        rows = analysis.compare(analysis.load(a), analysis.load(b))
    except (ValueError, KeyError, OSError) as e:
        print(f"attnlab: cannot compare {a} and {b}: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"attnlab: no timed configuration is common to {a} and {b}", file=sys.stderr)
        return 2
    print(f"{'mechanism':22} {'T':>6} {'mask':6} {'mode':8} {'time B/A':>9} {'xSDPA B/A':>10}")
    for r in rows:
        sp = "-" if r["speedup_ratio"] is None else f"{r['speedup_ratio']:.2f}"
        flag = "  REGRESSION" if r["regressed"] else ""
        mask = "causal" if r["causal"] else "full"
        print(f"{r['mechanism']:22} {r['T']:>6} {mask:6} {r['mode']:8} {r['time_ratio']:>9.2f} {sp:>10}{flag}")
    return 1 if any(r["regressed"] for r in rows) else 0


def _efficiency_lengths(dict_rows: list[dict]) -> None:
    from attnlab.bench import analysis

    found = analysis.efficiency_lengths(dict_rows)
    if not found:
        return
    print(
        "efficiency length (CAB): T above which the mechanism beats SDPA (quadratic vs linear fit);"
        " time ~ T^k: the log-log slope over the measured lengths"
    )
    for c in found:
        cells = []
        for what, T in (("time", c.time_T), ("memory", c.memory_T)):
            where = "never in fit" if T is None else f"{T:,.0f}" + ("" if c.in_range(T) else " (extrapolated)")
            cells.append(f"{what} {where}")
        if c.exponent is not None:
            cells.append(f"time ~ T^{c.exponent:.2f} ({min(c.lengths):,}-{max(c.lengths):,})")
        print(f"  {c.mechanism:22} {'causal' if c.causal else 'full':6} {c.mode:8} " + " · ".join(cells))


def _bench_input_problem(args) -> str | None:
    """What is wrong with the command line, found before any minute is spent benchmarking."""
    if args.lengths is not None and any(n <= 0 for n in args.lengths):
        return f"--lengths must be positive, got {args.lengths}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return NO_CUDA
    unknown = [n for n in args.flex or () if n != "all" and n not in registry.mechanisms()]
    if unknown:
        return f"--flex takes mechanism names or 'all', got {unknown}"
    if args.policies is not None and args.suite != "quality":
        return "--policies applies to the quality suite (--suite quality)"
    return _writable(args.out)


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _patterns(args) -> tuple[str, ...]:
    """LongCA-bench patterns to sweep: as asked; by default all of them in the full preset."""
    if args.patterns is None:
        return tuple(PATTERNS) if args.preset == "full" and not args.mechanisms else ()
    return tuple(PATTERNS) if "all" in args.patterns else tuple(args.patterns)


class _Parser(argparse.ArgumentParser):
    """Bad input: one line on stderr and exit status 2, no usage block and no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _writable(out: str) -> str | None:
    """None when results can be written under ``out``, else why not (checked before any work)."""
    try:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return None
    except OSError as e:
        return f"cannot write results to --out {out!r}: {e.strerror or e}"


@contextmanager
def _progress(timed: bool = False):
    """A transient rich progress bar (with elapsed and remaining time when ``timed``), or None
    without rich. Only the import is guarded: an ImportError from the work itself propagates."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    except ImportError:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*(columns if timed else ()), transient=True) as progress:
        yield progress


def cmd_quality(args) -> int:
    from attnlab.bench import report
    from attnlab.bench.quality import mechanisms, policies, suite
    from attnlab.bench.quality import report as qreport

    only_policies = args.policies is not None and not args.mechanisms
    names, notes = ([], []) if only_policies else mechanisms.select(args.mechanisms, args.preset)
    pols = policies.select(args.policies, args.preset, bool(args.mechanisms))
    device = _device(args)
    info = report.banner(device)
    print(f"machine: {info['cpu']} · {info['threads']} threads · torch {info['torch']} · device {info['device']}")
    tasks = args.tasks or list(suite.PRESETS[args.preset].tasks)
    t0 = time.perf_counter()
    try:
        with _progress(timed=True) as progress:
            rows, more = suite.run(
                names, args.preset, tasks, smoke=args.smoke, progress=progress, device=device, policies=pols
            )
    except suite.NothingToTrain as e:
        print(f"attnlab bench: error: {e}", file=sys.stderr)
        return 2
    notes += more
    wall = time.perf_counter() - t0
    meta = {
        "suite": "quality", "preset": args.preset, "tasks": tasks, "mechanisms": names, "policies": pols,
        "wall_s": wall,
    }  # fmt: skip
    out = qreport.write(rows, notes, info, meta, args.out)
    qreport.table(rows, notes, info)
    print(qreport.plot(rows, out))
    print(f"wrote {out}/quality.json ({len(rows)} rows, {wall:.0f} s)")
    return 1 if any(r["leak"] for r in rows) else 0


def cmd_bench(args) -> int:
    from attnlab.bench import baselines, efficiency, plots, report

    if args.compare:
        return cmd_compare(*args.compare)

    problem = _bench_input_problem(args)
    if problem:
        print(f"attnlab bench: error: {problem}", file=sys.stderr)
        return 2
    if args.suite == "quality":
        if args.threads:
            torch.set_num_threads(args.threads)
        return cmd_quality(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    device = _device(args)
    info = report.banner(device)
    print(f"machine: {info['cpu']} · {info['threads']} threads · torch {info['torch']} · device {info['device']}")
    print("correctness gate: the contract on small shapes for every mechanism (no speed for a failure)")
    kwargs = dict(
        preset=args.preset,
        lengths=tuple(args.lengths) if args.lengths else None,
        modes=tuple(args.modes),
        dtype=dtype,
        flex=tuple(args.flex) if args.flex is not None else None,
        causal=tuple(m == "causal" for m in args.masks),
        patterns=_patterns(args),
        device=device,
        gate_device="cpu" if args.gate == "cpu" else device,
    )
    names = [] if args.patterns and not args.mechanisms else args.mechanisms  # patterns alone: only patterns
    interrupted = None
    try:
        with _progress() as progress:
            rows, gate = efficiency.run(names, progress=progress, **kwargs)
    except efficiency.Interrupted as e:  # write what was measured; the exit status says it is partial
        interrupted, rows, gate = str(e), e.rows, e.failures
        info["interrupted"] = interrupted
    dict_rows = efficiency.rows_as_dicts(rows)
    if any(r["mechanism"] in baselines.FLA_MECHANISMS for r in dict_rows) and baselines.fla_status(device):
        info["notes"] = [baselines.fla_status(device)]
    report.table(dict_rows, info)
    print(efficiency.FLOP_RULE)
    info["flop_rule"] = efficiency.FLOP_RULE
    _efficiency_lengths(dict_rows)
    out = report.write(dict_rows, info, gate, args.out)
    drawn = plots.write(dict_rows, out)
    print(f"wrote {out}/results.json and results.csv" + ("" if isinstance(drawn, str) else f" and {len(drawn)} plots"))
    if isinstance(drawn, str):
        print(drawn)
    failed = [r for r in dict_rows if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} of {len(dict_rows)} rows failed (ERROR lines above); exit status 1")
    if interrupted:
        print(f"attnlab bench: {interrupted}; the results above are partial (exit status 130)")
        return 130
    return 1 if failed or any(gate.values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="attnlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="mechanisms, their impls, patterns, defaults and papers").set_defaults(fn=cmd_list)
    c = sub.add_parser(
        "check",
        help="the contract on tiny shapes: pass/fail per mechanism (exit 0 all pass, 1 any fails, 2 bad input)",
    )
    c.add_argument("names", nargs="*", metavar="mechanism", help="default: all")
    c.add_argument("--mechanisms", nargs="+", choices=registry.mechanisms(), help="the same, as an option")
    c.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="auto: CUDA when present")
    c.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: fp32 bf16, and fp64 on the CPU")
    c.add_argument("-v", "--verbose", action="store_true", help="every failing case, not only the first")
    c.set_defaults(fn=cmd_check)
    b = sub.add_parser(
        "bench",
        help="correctness gate, then timings against SDPA, Flex and fla (exit 1 when a row failed, 2 bad input)",
    )
    b.add_argument("--suite", choices=["efficiency", "quality"], default="efficiency")
    b.add_argument("--preset", choices=["quick", "full"], default="quick")
    b.add_argument("--mechanisms", nargs="+", choices=registry.mechanisms())
    b.add_argument("--lengths", nargs="+", type=int)
    b.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    b.add_argument("--masks", nargs="+", choices=["full", "causal"], default=["full", "causal"])
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp64"], default="fp32")
    b.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    b.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="where to time and train (auto: CUDA when present); CUDA timing uses CUDA events",
    )
    b.add_argument(
        "--flex",
        nargs="*",
        default=None,
        help="mechanisms to time against compiled Flex, or 'all' (default: all on CUDA, none on the CPU)",
    )
    b.add_argument(
        "--gate",
        choices=["device", "cpu"],
        default="device",
        help="where the correctness gate runs the contract (default: the benchmark's device)",
    )
    b.add_argument(
        "--patterns",
        nargs="*",
        default=None,
        choices=["all", *PATTERNS],
        help="LongCA-bench mask patterns to sweep",
    )
    b.add_argument("--out", default="results")
    b.add_argument("--compare", nargs=2, metavar=("A", "B"), help="ratios between two result folders; runs nothing")
    b.add_argument("--tasks", nargs="+", choices=["T1", "T2", "T3", "T4", "T5", "T6", "ICL"], help="quality suite")
    b.add_argument("--smoke", action="store_true", help="quality suite: tiny data, one epoch (tests)")
    b.add_argument(
        "--policies", nargs="+", choices=list(POLICIES), help="quality suite: layer policies (default: all in full)"
    )
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    if args.cmd == "check":
        bad = [m for m in args.names if m not in registry.mechanisms()]
        if bad:
            p.error(f"unknown mechanism(s) {bad}; valid: {', '.join(registry.mechanisms())}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

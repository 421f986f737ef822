"""attnlab command line: ``list``, ``check`` and ``bench efficiency | quality | compare``.

Exit status everywhere: 0 all good, 1 a mechanism or row failed (or a regression / leak was found),
2 bad input (one line on stderr, before any work), 130 interrupted (what was measured is written).
The PR-era spellings ``attnlab bench [--suite efficiency|quality] ...`` and ``attnlab bench --compare
A B`` map onto the subcommands (``_legacy_bench``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from attnlab import registry
from attnlab.bench.quality.catalog import TASKS
from attnlab.bench.quality.policies import POLICIES
from attnlab.bench.workloads import PATTERNS


def cmd_list(args) -> int:
    for m in registry.MECHANISMS:
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"
        patterns = ", ".join(p for p in registry.PATTERNS if p in m.patterns)
        print(f"{m.name}\n  impls:    auto, reference, {', '.join(m.impls)}\n  patterns: {patterns}")
        print(f"  defaults: {defaults}\n  paper:    {m.paper}")
    return 0


NO_CUDA = "--device cuda was asked for, but this torch build sees no CUDA device"


class BadInput(ValueError):
    """A command line found wrong before any work: one line on stderr, exit status 2."""


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
        raise BadInput(NO_CUDA)
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


def cmd_compare(args) -> int:
    """Time and speedup ratios between two result folders (exit 1 on a regression)."""
    from attnlab.bench import analysis, report

    a, b = args.a, args.b
    try:
        rows = analysis.compare(analysis.load(a), analysis.load(b))
    except (ValueError, KeyError, OSError) as e:
        raise BadInput(f"cannot compare {a} and {b}: {e}") from e
    if not rows:
        raise BadInput(f"no timed configuration is common to {a} and {b}")
    report.comparison(rows)
    return 1 if any(r["regressed"] for r in rows) else 0


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _writable(out: str) -> None:
    """Raise BadInput unless results can be written under ``out`` (checked before any work)."""
    try:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise BadInput(f"cannot write results to --out {out!r}: {e.strerror or e}") from e


def _start_suite(args) -> torch.device:
    """What both suites check and set up before any work, once: the device, --out, --threads."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput(NO_CUDA)
    _writable(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    return _device(args)


class _Parser(argparse.ArgumentParser):
    """Bad input: one line on stderr and exit status 2, no usage block and no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def _print_banner(info: dict) -> None:
    print(f"machine: {info['cpu']} · {info['threads']} threads · torch {info['torch']} · device {info['device']}")


def cmd_quality(args) -> int:
    """Train the quality suite (exit 1 when a mask leaks, 2 when nothing is left to train)."""
    from attnlab.bench import plots, report
    from attnlab.bench.quality import mechanisms, policies, run
    from attnlab.bench.quality import report as qreport
    from attnlab.bench.quality.catalog import PRESETS

    device = _start_suite(args)
    only_policies = args.policies is not None and not args.mechanisms
    names, notes = ([], []) if only_policies else mechanisms.select(args.mechanisms, args.preset)
    pols = policies.select(args.policies, args.preset, bool(args.mechanisms))
    info = report.banner(device)
    _print_banner(info)
    tasks = args.tasks or list(PRESETS[args.preset].tasks)
    t0 = time.perf_counter()
    try:
        with _progress(timed=True) as progress:
            listener = qreport.ProgressBar(progress) if progress else None
            kw = dict(smoke=args.smoke, listener=listener, device=device, policies=pols)
            rows, more = run.run(names, args.preset, tasks, **kw)
    except run.NothingToTrain as e:
        raise BadInput(str(e)) from e
    notes += more
    wall = time.perf_counter() - t0
    meta = {
        "suite": "quality", "preset": args.preset, "tasks": tasks, "mechanisms": names, "policies": pols,
        "wall_s": wall,
    }  # fmt: skip
    out = qreport.write(rows, notes, info, meta, args.out)
    qreport.table(rows, notes, info)
    try:
        print(f"plot: {qreport.plot(rows, out)}")
    except plots.PlotsUnavailable as e:
        print(e)
    print(f"wrote {out}/quality.json ({len(rows)} rows, {wall:.0f} s)")
    return 1 if any(r["leak"] for r in rows) else 0


def _patterns(args) -> tuple[str, ...]:
    """LongCA-bench patterns to sweep: as asked; by default all of them in the full preset."""
    if args.patterns is None:
        return tuple(PATTERNS) if args.preset == "full" and not args.mechanisms else ()
    return tuple(PATTERNS) if "all" in args.patterns else tuple(args.patterns)


def _check_efficiency(args) -> None:
    if args.lengths is not None and any(n <= 0 for n in args.lengths):
        raise BadInput(f"--lengths must be positive, got {args.lengths}")
    unknown = [n for n in args.flex or () if n != "all" and n not in registry.mechanisms()]
    if unknown:
        raise BadInput(f"--flex takes mechanism names or 'all', got {unknown}")


def _efficiency_kwargs(args, device: torch.device) -> dict:
    return dict(
        preset=args.preset,
        lengths=tuple(args.lengths) if args.lengths else None,
        modes=tuple(args.modes),
        dtype=DTYPES[args.dtype],
        flex=tuple(args.flex) if args.flex is not None else None,
        causal=tuple(m == "causal" for m in args.masks),
        patterns=_patterns(args),
        device=device,
        gate_device="cpu" if args.gate == "cpu" else device,
    )


def cmd_efficiency(args) -> int:
    """Gate, then time (exit 1 when a row or the gate failed, 130 when interrupted)."""
    from attnlab.bench import analysis, baselines, efficiency, plots, report

    _check_efficiency(args)
    device = _start_suite(args)
    kwargs = _efficiency_kwargs(args, device)
    info = report.banner(device)
    _print_banner(info)
    print("correctness gate: the contract on small shapes for every mechanism (no speed for a failure)")
    names = [] if args.patterns and not args.mechanisms else args.mechanisms  # patterns alone: only patterns
    interrupted = None
    try:
        with _progress() as progress:
            rows, gate = efficiency.run(names, progress=progress, **kwargs)
    except efficiency.Interrupted as e:  # write what was measured; the exit status says it is partial
        interrupted, rows, gate = str(e), e.rows, e.failures
        info["interrupted"] = interrupted
    dict_rows = efficiency.rows_as_dicts(rows)
    fla = baselines.fla_status(device)
    if fla and any(baselines.has_fla_bridge(registry.get(r["mechanism"])) for r in dict_rows):
        info["notes"] = [fla]
    report.table(dict_rows, info)
    print(efficiency.FLOP_RULE)
    info["flop_rule"] = efficiency.FLOP_RULE
    report.efficiency_lengths(analysis.efficiency_lengths(dict_rows))
    out = report.write(dict_rows, info, gate, args.out)
    try:
        drawn = f" and {len(plots.write(dict_rows, out))} plots"
    except plots.PlotsUnavailable as e:
        drawn = f"\n{e}"
    print(f"wrote {out}/results.json and results.csv{drawn}")
    failed = [r for r in dict_rows if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} of {len(dict_rows)} rows failed (ERROR lines above); exit status 1")
    if interrupted:
        print(f"attnlab bench: {interrupted}; the results above are partial (exit status 130)")
        return 130
    return 1 if failed or any(gate.values()) else 0


SUBCOMMANDS = ("efficiency", "quality", "compare")


def _legacy_bench(argv: list[str]) -> list[str]:
    """``bench`` arguments in the old flat spelling, mapped onto a subcommand: ``--compare A B`` ->
    ``compare A B``, ``--suite quality|efficiency ...`` -> that suite, anything else -> efficiency."""
    if argv and argv[0] in (*SUBCOMMANDS, "-h", "--help"):
        return argv
    rest = list(argv)
    if "--compare" in rest:
        i = rest.index("--compare")
        return ["compare", *rest[i + 1 : i + 3], *rest[:i], *rest[i + 3 :]]
    for i, arg in enumerate(rest):
        if arg == "--suite" and i + 1 < len(rest):
            return [rest[i + 1], *rest[:i], *rest[i + 2 :]]
        if arg.startswith("--suite="):
            return [arg.split("=", 1)[1], *rest[:i], *rest[i + 1 :]]
    return ["efficiency", *rest]


def _suite_options(parent: argparse.ArgumentParser) -> None:
    """Options both suites take, handled once (``_start_suite``)."""
    parent.add_argument("--preset", choices=["quick", "full"], default="quick")
    parent.add_argument("--mechanisms", nargs="+", choices=registry.mechanisms())
    parent.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    parent.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="where to time and train (auto: CUDA when present); CUDA timing uses CUDA events",
    )
    parent.add_argument("--out", default="results")


def _efficiency_parser(sub, parent) -> None:
    e = sub.add_parser(
        "efficiency",
        parents=[parent],
        help="correctness gate, then timings against SDPA, Flex and fla (exit 1 when a row failed, 2 bad input)",
    )
    e.add_argument("--lengths", nargs="+", type=int)
    e.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    e.add_argument("--masks", nargs="+", choices=["full", "causal"], default=["full", "causal"])
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp64"], default="fp32")
    e.add_argument(
        "--flex",
        nargs="*",
        default=None,
        help="mechanisms to time against compiled Flex, or 'all' (default: all on CUDA, none on the CPU)",
    )
    e.add_argument(
        "--gate",
        choices=["device", "cpu"],
        default="device",
        help="where the correctness gate runs the contract (default: the benchmark's device)",
    )
    e.add_argument("--patterns", nargs="*", default=None, choices=["all", *PATTERNS], help="LongCA-bench patterns")
    e.set_defaults(fn=cmd_efficiency)


def _quality_parser(sub, parent) -> None:
    q = sub.add_parser("quality", parents=[parent], help="train small models on recall tasks (exit 1 on a leak)")
    q.add_argument("--tasks", nargs="+", choices=list(TASKS))
    q.add_argument("--smoke", action="store_true", help="tiny data, one epoch (tests)")
    q.add_argument("--policies", nargs="+", choices=list(POLICIES), help="layer policies (default: all in full)")
    q.set_defaults(fn=cmd_quality)


def _bench_parser(sub) -> dict[str, argparse.ArgumentParser]:
    """The ``bench`` command; returns its suites' parsers by name."""
    b = sub.add_parser("bench", help="efficiency | quality | compare (the old flat spelling still works)")
    suites = b.add_subparsers(dest="suite", required=True, parser_class=_Parser)
    parent = _Parser(add_help=False)
    _suite_options(parent)
    _efficiency_parser(suites, parent)
    _quality_parser(suites, parent)
    c = suites.add_parser("compare", help="time and speedup ratios between two result folders (exit 1: regression)")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.set_defaults(fn=cmd_compare)
    return suites.choices


def _misplaced(parser: _Parser, suites: dict, args: argparse.Namespace, extra: list[str]) -> None:
    """Arguments a bench subcommand left over: say which suite an option belongs to, if another."""
    # argparse lists a parser's options only in _actions (no public accessor)
    options = {name: {s for a in sp._actions for s in a.option_strings} for name, sp in suites.items()}
    for arg in extra:
        flag = arg.split("=", 1)[0]
        owner = next((s for s, opts in options.items() if s != args.suite and flag in opts), None)
        if owner:
            raise BadInput(f"{flag} applies to the {owner} suite (attnlab bench {owner})")
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _parser() -> tuple[_Parser, dict[str, argparse.ArgumentParser]]:
    p = _Parser(prog="attnlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
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
    return p, _bench_parser(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = ["bench", *_legacy_bench(argv[1:])]
    p, suites = _parser()
    args, extra = p.parse_known_args(argv)
    try:
        if extra:
            _misplaced(p, suites, args, extra)
        if args.cmd == "check":
            bad = [m for m in args.names if m not in registry.mechanisms()]
            if bad:
                p.error(f"unknown mechanism(s) {bad}; valid: {', '.join(registry.mechanisms())}")
        return args.fn(args)
    except BadInput as e:
        where = "attnlab bench" if args.cmd == "bench" else f"attnlab {args.cmd}"
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``attnlab bench efficiency | quality | compare``: the benchmark's subcommands, each with only its
own flags, and the old flat spelling mapped onto them (``legacy_bench``). Also the command line's
shared conventions, which ``attnlab check`` follows too: bad input is :class:`BadInput` (one line on
stderr, exit status 2, before any work) and :class:`Parser` says argparse's errors in one line.

Exit status: 0 all good, 1 a row or the gate failed (a regression, a leak), 2 bad input, 130
interrupted (what was measured is written)."""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from attnlab import registry
from attnlab.bench.quality.catalog import TASKS
from attnlab.bench.quality.policies import POLICIES
from attnlab.bench.workloads import PATTERNS

NO_CUDA = "--device cuda was asked for, but this torch build sees no CUDA device"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


class BadInput(ValueError):
    """A command line found wrong before any work: one line on stderr, exit status 2."""


def cmd_compare(args) -> int:
    """Time and speedup ratios between two result folders (exit 1 on a regression)."""
    from attnlab.bench import analysis, report

    a, b = args.a, args.b
    try:
        for name, given in (("A", a), ("B", b)):
            path, picked = analysis.run_file(given)
            if picked:
                print(f"{name}: the latest run in {given}: {path.parent.name}")
        rows = analysis.compare(analysis.load(a), analysis.load(b))
    except (ValueError, KeyError, OSError) as e:
        raise BadInput(f"cannot compare {a} and {b}: {e}") from e
    if not rows:
        raise BadInput(f"no timed configuration is common to {a} and {b}")
    report.comparison(rows)
    return 1 if any(r["regressed"] for r in rows) else 0


def device_of(args) -> torch.device:
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
    return device_of(args)


class Parser(argparse.ArgumentParser):
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


def legacy_bench(argv: list[str]) -> list[str]:
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


def positive_threads(text: str) -> int:
    """argparse type of ``--threads``: a positive int (torch refuses 0 and negatives with a traceback)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return n


def _suite_options(parent: argparse.ArgumentParser) -> None:
    """Options both suites take, handled once (``_start_suite``)."""
    parent.add_argument("--preset", choices=["quick", "full"], default="quick")
    parent.add_argument("--mechanisms", nargs="+", choices=registry.mechanisms())
    parent.add_argument("--threads", type=positive_threads, help="intra-op threads, > 0 (default: torch's)")
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


def add_bench(sub) -> dict[str, argparse.ArgumentParser]:
    """The ``bench`` command; returns its suites' parsers by name."""
    b = sub.add_parser("bench", help="efficiency | quality | compare (the old flat spelling still works)")
    suites = b.add_subparsers(dest="suite", required=True, parser_class=Parser)
    parent = Parser(add_help=False)
    _suite_options(parent)
    _efficiency_parser(suites, parent)
    _quality_parser(suites, parent)
    c = suites.add_parser("compare", help="time and speedup ratios between two result folders (exit 1: regression)")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.set_defaults(fn=cmd_compare)
    return suites.choices


def misplaced(parser: Parser, suites: dict, args: argparse.Namespace, extra: list[str]) -> None:
    """Arguments a bench subcommand left over: say which suite an option belongs to, if another."""
    # argparse lists a parser's options only in _actions (no public accessor)
    options = {name: {s for a in sp._actions for s in a.option_strings} for name, sp in suites.items()}
    for arg in extra if args.cmd == "bench" else ():
        flag = arg.split("=", 1)[0]
        owners = [s for s, opts in options.items() if s != args.suite and flag in opts]
        if owners:
            which = f"the {owners[0]} suite" if len(owners) == 1 else f"the {' and '.join(owners)} suites"
            raise BadInput(f"{flag} applies to {which} (attnlab bench {owners[0]})")
    parser.error(f"unrecognized arguments: {' '.join(extra)}")

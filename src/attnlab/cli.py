"""attnlab command line: ``list``, ``check`` and ``bench efficiency | quality | compare``.

Exit status everywhere: 0 all good, 1 a mechanism or row failed (or a regression / leak was found),
2 bad input (one line on stderr, before any work), 130 interrupted (what was measured is written).
The older spellings ``attnlab bench [--suite efficiency|quality] ...`` and ``attnlab bench --compare
A B`` map onto the subcommands (``bench.commands.legacy_bench``)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import torch

from attnlab import registry
from attnlab.bench.commands import DTYPES, NO_CUDA, BadInput, Parser, add_bench, device_of, legacy_bench, misplaced


def cmd_list(args) -> int:
    if args.doc:
        print(describe(registry.get(args.doc)))
    if args.plot:
        if args.length <= 0:
            raise BadInput(f"--length must be positive, got {args.length}")
        try:
            print(plot_defaults(registry.get(args.plot), args.out, args.length, args.causal))
        except (ValueError, ImportError, OSError) as e:  # no picture for it, no matplotlib, or no folder
            raise BadInput(f"cannot plot {args.plot}: {e}") from e
    if args.doc or args.plot:
        return 0
    for m in registry.MECHANISMS:
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"
        patterns = ", ".join(p for p in registry.PATTERNS if p in m.patterns)
        print(f"{m.name}\n  impls:    auto, reference, {', '.join(m.impls)}\n  patterns: {patterns}")
        print(f"  defaults: {defaults}\n  paper:    {m.paper}")
    return 0


def module_of(record: registry.Mechanism):
    """The mechanism module whose ``SPEC`` is ``record`` (its docstring is the mechanism's write-up)."""
    import attnlab.mechanisms as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if getattr(module, "SPEC", None) is record:
            return module
    raise LookupError(f"no module in {package.__name__} declares the record of {record.name}")


def describe(m: registry.Mechanism) -> str:
    """``attnlab list --doc``: the module docstring (paper, exact rule, resolved ambiguities), then the record."""
    module = module_of(m)
    doc = inspect.cleandoc(module.__doc__ or "(no module docstring)")
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = [
        f"{m.name}  ({module.__name__})",
        "",
        doc,
        "",
        f"record (attnlab.get({m.name!r})):",
        f"  kind:        {m.kind.value}",
        f"  paper:       {m.paper}",
        f"  patterns:    {', '.join(p for p in registry.PATTERNS if p in m.patterns)}",
        f"  devices:     {', '.join(sorted(m.devices))}",
        f"  has_lse:     {yes(m.has_lse)}" + ("" if m.has_lse else f" ({m.no_lse})"),
        f"  drop_in:     {yes(m.drop_in)}",
        f"  selects:     {yes(m.selects)}",
        f"  fixed_state: {yes(m.fixed_state)}",
        f"  per_kv_head: {yes(m.per_kv_head)}",
        f"  axis_causal: {yes(m.axis_causal)}",
        f"  defaults:    {', '.join(f'{k}={v}' for k, v in m.defaults.items()) or '-'}",
        "  impls:       auto, reference, "
        + ", ".join(n + (" (traced under torch.compile)" if i.traced else "") for n, i in m.impls.items()),
    ]
    return "\n".join(lines)


def plot_defaults(m: registry.Mechanism, out: str, length: int, causal: bool | None) -> str:
    """``attnlab list --plot``: the record's mask at its defaults over ``length`` tokens; where the
    defaults need a shape (a grid, documents, groups), its ``example(64)`` over 64. A mechanism with
    no fixed mask draws the selection, or else the weights, of a seeded random input at ``example(64)``.
    Returns what was written, for the user."""
    from attnlab import plot

    causal = "self_causal" in m.patterns if causal is None else causal
    path = Path(out) / f"{m.name}_mask.png"
    if m.mask is not None:
        try:
            m.resolve(length, length, causal, {})
        except ValueError as e:  # the defaults need a shape: the record's example is a valid one
            path = plot.mask(m.name, 64, causal=causal, path=path, **m.example(64))
            return f"{path}  (the defaults need a shape ({e}); drew example(64): {m.example(64)})"
        return str(plot.mask(m.name, length, causal=causal, path=path))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g) for h in (4, 2, 2))
    opts = m.resolve(64, 64, causal, m.example(64))
    if m.selects:
        path = plot.selection(
            m.select(q, k, causal=causal, scale=None, **opts), path.with_name(f"{m.name}_selection.png")
        )
        what = "selection"
    else:
        path = plot.weights(q, k, v, m.name, causal=causal, path=path.with_name(f"{m.name}_weights.png"), **opts)
        what = "attention weights (head 0)"
    return f"{path}  ({m.name} is a {m.kind.value} mechanism with no fixed mask: the {what} of a seeded random input)"


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
    device = device_of(args)
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


def _parser() -> tuple[Parser, dict[str, argparse.ArgumentParser]]:
    p = Parser(prog="attnlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    ls = sub.add_parser("list", help="mechanisms, their impls, patterns, defaults and papers")
    names = registry.mechanisms()
    ls.add_argument(
        "--doc", choices=names, metavar="NAME", help="the mechanism's write-up (paper, exact rule) and record"
    )
    ls.add_argument("--plot", choices=names, metavar="NAME", help="write the picture of its mask at the defaults")
    ls.add_argument("--out", default=".", metavar="DIR", help="folder for --plot (default: the current one)")
    ls.add_argument("--length", type=int, default=1024, metavar="T", help="tokens of the --plot mask (default 1024)")
    ls.add_argument("--causal", action=argparse.BooleanOptionalAction, help="--plot: default causal where supported")
    ls.set_defaults(fn=cmd_list)
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
    return p, add_bench(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = ["bench", *legacy_bench(argv[1:])]
    p, suites = _parser()
    args, extra = p.parse_known_args(argv)
    try:
        if extra:
            misplaced(p, suites, args, extra)
        if args.cmd == "check":
            bad = [m for m in args.names if m not in registry.mechanisms()]
            if bad:
                p.error(f"unknown mechanism(s) {bad}; valid: {', '.join(registry.mechanisms())}")
        return args.fn(args)
    except BadInput as e:
        print(f"attnlab {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

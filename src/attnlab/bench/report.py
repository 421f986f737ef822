"""Reports: a terminal table, JSON and CSV under ``results/<timestamp>/``, with a machine banner."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

import torch


def banner(device: torch.device | str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "device": str(device),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(v, spec) -> str:
    """A cell: ``spec`` is a format spec, or a function of the value for cells with their own rule."""
    if v is None:
        return "-"
    return spec(v) if callable(spec) else format(v, spec)


def memory(mib: float) -> str:
    """A size in the unit that fits it (B, KiB, MiB, GiB), three significant digits or more, so a small
    run's peak reads ``384 KiB`` rather than ``0`` MiB; the JSON and CSV keep the exact MiB."""
    size, unit = mib * 2**20, "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, bigger
    digits = 0 if unit == "B" or abs(size) >= 100 else 1 if abs(size) >= 10 else 2
    return f"{size:.{digits}f} {unit}"


def options(text: str, width: int = 32) -> str:
    """A row's options (already one short string per value) cut to ``width`` characters for the table."""
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS = [
    ("mechanism", "mechanism", "s"),
    ("T", "T", "d"),
    ("mask", "pattern", "s"),
    ("options", "options", options),
    ("mode", "mode", "s"),
    ("status", "status", "s"),
    ("median ms", "median_ms", ".1f"),
    ("first ms", "first_ms", ".0f"),
    ("spread", "spread", ".0%"),
    ("density", "density", ".3f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("x SDPA", "vs_sdpa", ".2f"),
    ("ideal x", "ideal_vs_sdpa", ".1f"),
    ("x Flex", "vs_flex", ".2f"),
    ("x fla", "vs_fla", ".2f"),
    ("peak mem", "peak_mib", memory),
    ("peak/qkv", "peak_vs_qkv", ".2f"),
    ("build ms", "build_ms", ".0f"),
]


LEFT = ("mechanism", "mask", "options", "mode", "status")


def _notes(rows: list[dict], info: dict) -> list[str]:
    """Errors first (one line each), then notes, then the run's own notes (e.g. a skipped baseline)."""
    where = lambda r: f"{r['mechanism']} T={r['T']} {r['pattern']} {r['mode']}"  # noqa: E731
    errors = [f"ERROR {where(r)}: {r['error']}" for r in rows if r.get("error")]
    notes = [f"{where(r)}: {r['note']}" for r in rows if r.get("note")]
    return errors + notes + list(info.get("notes", ()))


def table(rows: list[dict], info: dict) -> None:
    """Print the table with rich when installed, plain text otherwise; errors and notes follow it."""
    rows = [{**r, "pattern": r.get("pattern") or ("causal" if r["causal"] else "full")} for r in rows]
    notes = _notes(rows, info)
    cells = [[_fmt(r.get(key), spec) for _, key, spec in COLUMNS] for r in rows]
    title = f"attnlab bench — {info['cpu']} · {info['threads']} threads · torch {info['torch']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
        print("  ".join(h.ljust(w) for (h, _, _), w in zip(COLUMNS, widths)))
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
        print("\n".join(notes))
        return
    t = Table(title=title, header_style="bold")
    for h, _, _ in COLUMNS:
        t.add_column(h, justify="left" if h in LEFT else "right", no_wrap=True)
    for c in cells:
        t.add_row(*c)
    console = Console(width=None if Console().is_terminal else 400)  # a file or pipe: never cut cells
    console.print(t)
    for n in notes:
        console.print(n, markup=False, highlight=False)


def write(rows: list[dict], info: dict, gate: dict, out_root: str | Path = "results") -> Path:
    out = Path(out_root) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": info, "gate": gate, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mechanism"])
        w.writeheader()
        w.writerows(rows)
    return out


def efficiency_lengths(found: list) -> None:
    """Print CAB's efficiency lengths and the measured scaling exponents (``analysis.Crossing``)."""
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


def comparison(rows: list[dict]) -> None:
    """Print two runs' comparison (``analysis.compare``), REGRESSION flags included."""
    print(f"{'mechanism':22} {'T':>6} {'mask':6} {'mode':8} {'time B/A':>9} {'xSDPA B/A':>10}")
    for r in rows:
        sp = "-" if r["speedup_ratio"] is None else f"{r['speedup_ratio']:.2f}"
        flag = "  REGRESSION" if r["regressed"] else ""
        mask = "causal" if r["causal"] else "full"
        print(f"{r['mechanism']:22} {r['T']:>6} {mask:6} {r['mode']:8} {r['time_ratio']:>9.2f} {sp:>10}{flag}")

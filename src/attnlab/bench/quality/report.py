"""The quality report: a terminal table (rich when installed), ``quality.json`` and a PNG of accuracy
against difficulty per mechanism, under ``<out>/<timestamp>/``; and the live progress bar of a run
(a :class:`run.Listener` drawing on a rich ``Progress``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from attnlab.bench.plots import PlotsUnavailable
from attnlab.bench.quality.run import Listener


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"


def _value(r: dict) -> str:
    text = f"mse {r['value']:.3f}" if r["metric"] == "mse" else f"{r['value']:.3f}"
    if r.get("sparse_share") is not None:  # a routed policy: how often its routers chose sparse
        text += f" ({r['sparse_share']:.0%} sparse)"
    return text


def _slices(r: dict) -> str:
    """Compact slice line: 'lo-hi:acc' (the cap in brackets where there is one)."""
    parts = []
    for s in r["slices"]:
        cap = f"[{s['cap']:.2f}]" if "cap" in s else ""
        parts.append(f"{s['lo']}-{s['hi'] - 1}:{s['value']:.2f}{cap}")
    return " ".join(parts)


COLUMNS = ("task", "difficulty", "mechanism", "d", "score", "cap", "params", "state", "lr", "by " + "slice")


def leak_lines(rows: list[dict]) -> list[str]:
    return [
        f"LEAK: {r['label']} on {r['task']} {r['difficulty']}: accuracy {r['value']:.3f} > reach cap {r['cap']:.3f} "
        "+ 0.02: the mask lets the answer through"
        for r in rows
        if r["leak"]
    ]


def table(rows: list[dict], notes: list[str], info: dict) -> None:
    cells = [
        [
            r["task"],
            r["difficulty"],
            r["label"],
            str(r["dim"]),
            _value(r),
            "-" if r["cap"] is None else f"{r['cap']:.3f}",
            f"{r['params']:,}",
            _bytes(r["state_bytes"]),
            f"{r['best_lr']:g}",
            f"{r['slice_name']} " + _slices(r),
        ]
        for r in rows
    ]
    title = f"attnlab quality — {info['cpu']} · {info['threads']} threads · torch {info['torch']}"
    lines = [*leak_lines(rows), *notes]
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
        for c in [list(COLUMNS), *cells]:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
        print("\n".join(lines))
        return
    t = Table(title=title, header_style="bold")
    for h in COLUMNS:
        t.add_column(h, justify="right" if h in ("d", "score", "cap", "params", "state", "lr") else "left")
    for c, r in zip(cells, rows):  # labels hold brackets (policies' layers): text, not markup
        t.add_row(*(Text(x) for x in c), style="bold red" if r["leak"] else None)
    console = Console(width=None if Console().is_terminal else 220)
    console.print(t)
    for line in lines:
        console.print(line, style="bold red" if line.startswith("LEAK") else None, markup=False)


def write(rows: list[dict], notes: list[str], info: dict, meta: dict, out_root: str | Path) -> Path:
    out = Path(out_root) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, **meta, "leaks": leak_lines(rows), "notes": notes, "rows": rows}
    (out / "quality.json").write_text(json.dumps(doc, indent=2))
    return out


def plot(rows: list[dict], out: Path) -> Path:
    """quality.png: one panel per task, score against difficulty, one line per mechanism (dashed: the
    reach cap). Raises :class:`PlotsUnavailable` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable("plot: matplotlib is not installed (pip install attnlab[viz]); no quality.png") from e
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys((r["mechanism"], r["dim"]) for r in rows))}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        diffs = list(dict.fromkeys(r["difficulty"] for r in sub))
        for mech in dict.fromkeys((r["mechanism"], r["dim"]) for r in sub):
            mine = [r for r in sub if (r["mechanism"], r["dim"]) == mech]
            xs = [diffs.index(r["difficulty"]) for r in mine]
            name = f"{mech[0]} d={mech[1]}"
            (line,) = ax.plot(xs, [r["value"] for r in mine], "o-", color=colors[mech], label=name)
            caps = [(x, r["cap"]) for x, r in zip(xs, mine) if r["cap"] is not None]
            if caps:
                ax.plot(*zip(*caps), "x--", color=line.get_color(), alpha=0.6, label=f"{name} cap")
        ax.set_xticks(range(len(diffs)), diffs, rotation=30, ha="right", fontsize=7)
        metric = sub[0]["metric"]
        ax.set_title(f"{task}: {sub[0]['task_name']}", fontsize=9)
        ax.set_ylabel("normalized MSE" if metric == "mse" else "accuracy")
        if metric != "mse":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
    return out / "quality.png"


def job_line(r: dict) -> str:
    """One finished job, as the run prints it above the progress bar (and into logs)."""
    cap = "" if r["cap"] is None else f" (cap {r['cap']:.3f})"
    what = f"{r['task']} {r['difficulty']} · {r['label']} d={r['dim']}"
    return f"{what}: {r['metric']} {r['value']:.3f}{cap} · {r['seconds']:.0f} s"


class ProgressBar(Listener):
    """A run's progress on a rich ``Progress``: one bar over the planned steps, each finished job's
    line kept above it."""

    def __init__(self, progress):
        self.progress, self.bar = progress, None

    def start(self, total_steps: int) -> None:
        self.bar = self.progress.add_task("quality", total=total_steps)

    def run_started(self, job, lr: float, seed: int) -> None:
        desc = f"{job.point.task} {job.point.difficulty} · {job.label} · lr {lr:g} seed {seed}"
        self.progress.update(self.bar, description=desc)

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.bar, steps)

    def job_done(self, row: dict) -> None:
        self.progress.console.print(job_line(row), markup=False, highlight=False)

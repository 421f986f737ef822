"""PNG plots of an efficiency run (matplotlib, the ``[viz]`` extra).

* ``latency_<mode>.png``: median time against length, one line per mechanism, options and mask, with
  SDPA on the same inputs in black (each row's SDPA time is ``median_ms * vs_sdpa``). A row whose fast
  path *is* SDPA (``baseline``) is that black line, not a second copy of it.
* ``speedup_vs_density.png``: speedup over SDPA against density, a dashed line at 1 (SDPA's speed);
  colour is the length, the marker the mode, filled for causal and hollow for full.
* ``memory.png``: peak memory against length, one panel per mode, SDPA's peak in black.

With a single length, a line plot would be one dot per series on an empty log plot: latency and
memory are drawn as bars instead. :func:`figures` builds the figures without saving them (what the
tests inspect); :func:`write` saves them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from attnlab.bench.report import memory

MARKERS = {"fwd": "o", "fwd+bwd": "s"}
LEGEND_FONT = 8
CROWDED = 6  # legends with more entries go outside the axes, right of them


class PlotsUnavailable(RuntimeError):
    """matplotlib (the ``[viz]`` extra) is not installed: no plot can be drawn."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable("plots skipped: matplotlib is not installed (pip install 'attnlab[viz]')") from e
    return plt


def write(rows: list[dict], out: Path) -> list[Path]:
    """The plots under ``out``; raises :class:`PlotsUnavailable` when matplotlib is missing."""
    plt = _pyplot()
    paths = []
    for name, fig in figures(rows).items():
        fig.savefig(Path(out) / name, dpi=120, bbox_inches="tight")  # tight: keeps an outside legend
        plt.close(fig)
        paths.append(Path(out) / name)
    return paths


def figures(rows: list[dict]) -> dict:
    """``{file name: matplotlib Figure}`` for the timed rows, nothing saved."""
    plt = _pyplot()
    timed = [r for r in rows if r.get("median_ms") is not None]
    modes = sorted({r["mode"] for r in timed}, key=lambda m: (m != "fwd", m))
    out = {}
    for mode in modes:
        fig, ax = plt.subplots(figsize=(7, 5))
        sel = [r for r in timed if r["mode"] == mode]
        sdpa = {(r["T"], r["causal"]): r["median_ms"] * r["vs_sdpa"] for r in sel if r.get("vs_sdpa")}
        _by_length(ax, sel, "median_ms", sdpa)
        ax.set(ylabel="median ms", title=f"latency, {mode} (SDPA in black)")
        out[f"latency_{mode.replace('+', '_')}.png"] = fig
    out["speedup_vs_density.png"] = _speedup(plt, timed)
    mem = [r for r in timed if r.get("peak_mib") is not None]
    if mem:
        out["memory.png"] = _memory(plt, mem, [m for m in modes if any(r["mode"] == m for r in mem)])
    for fig in out.values():
        fig.tight_layout()
    return out


def _memory(plt, rows: list[dict], modes: list[str]):
    """Peak memory against length, one panel per mode, in KiB/MiB/GiB as the table shows it."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        sdpa = {(r["T"], r["causal"]): r["sdpa_peak_mib"] for r in sel if r.get("sdpa_peak_mib") is not None}
        _by_length(ax, sel, "peak_mib", sdpa)
        if ax.get_yscale() == "log":  # powers of two: 4.00 KiB, 8.00 KiB, not 5.12 KiB
            ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: memory(v)))  # 4.00 KiB, not 0.004
        ax.set(ylabel="peak memory above the start", title=f"peak memory, {mode} (SDPA in black)")
    return fig


def label(r: dict) -> str:
    """A series' legend entry: mechanism, mask (or sweep pattern) and options."""
    mask = r.get("pattern") or ("causal" if r["causal"] else "full")
    return f"{r['mechanism']}, {mask}" + (f" ({r['options']})" if r.get("options") else "")


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by mechanism and mask, each sorted by length, under their legend entry; SDPA's own
    rows are left to the baseline. Options that change with T (a document mix) are not spelled out."""
    groups: dict = {}
    for r in sorted(rows, key=lambda r: r["T"]):
        if not r.get("baseline"):
            groups.setdefault((r["mechanism"], r.get("pattern") or r["causal"]), []).append(r)
    out = {}
    for rs in groups.values():
        varies = len({r.get("options") for r in rs}) > 1
        out[label({**rs[0], "options": "options vary with T"} if varies else rs[0])] = rs
    return out


def _sdpa_series(sdpa: dict) -> dict[str, tuple[list, list]]:
    """SDPA's value per mask: ``{"SDPA, causal": (lengths, values)}``, one value per length (the median
    over the rows that timed SDPA on those inputs)."""
    out = {}
    for causal in sorted({c for _, c in sdpa}, reverse=True):
        lengths = sorted({T for T, c in sdpa if c == causal})
        values = [statistics.median(v for (T, c), v in sdpa.items() if (T, c) == (t, causal)) for t in lengths]
        out[f"SDPA, {'causal' if causal else 'full'}"] = (lengths, values)
    return out


def _by_length(ax, rows: list[dict], key: str, sdpa: dict) -> None:
    """``key`` against length, one line per series plus SDPA's, on log-log axes; bars at one length."""
    series, baseline = _series(rows), _sdpa_series(sdpa)
    if len({r["T"] for r in rows}) == 1:
        _bars(ax, series, key, baseline, rows[0]["T"])
        return
    for i, (name, rs) in enumerate(series.items()):
        style = "-" if rs[0]["causal"] else ":"
        ax.plot([r["T"] for r in rs], [r[key] for r in rs], style, marker="o", color=f"C{i % 10}", label=name)
    for name, (lengths, values) in baseline.items():
        style = "-" if name.endswith("causal") else ":"
        ax.plot(lengths, values, style, marker="x", color="black", lw=2, label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (log)")
    lengths = sorted({r["T"] for r in rows})
    ax.set_xticks(lengths, [f"{t:,}" for t in lengths], minor=False)
    ax.minorticks_off()
    _plain_log(ax.yaxis)
    _legend(ax)


def _plain_log(axis) -> None:
    """Log-axis ticks at 1, 2, 3, 5 x 10^k written as plain numbers: one ``10^2`` tick reads as nothing."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # matplotlib is optional

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _bars(ax, series: dict, key: str, baseline: dict, T: int) -> None:
    """One bar per series at a single length, SDPA's bars first in black and grey."""
    names = list(baseline) + list(series)
    heights = [values[0] for _, values in baseline.values()] + [rs[0][key] for rs in series.values()]
    colors = ["black", "dimgrey"][: len(baseline)] + [f"C{i % 10}" for i in range(len(series))]
    for i, (name, height, color) in enumerate(zip(names, heights, colors)):
        ax.bar(i, height, color=color, label=name)
    ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=30, ha="right", fontsize=LEGEND_FONT)
    ax.set(xlabel=f"T = {T:,}")
    _legend(ax)


def _speedup(plt, rows: list[dict]):
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [r for r in rows if r.get("density") and r.get("vs_sdpa")]
    lengths = sorted({r["T"] for r in pts})
    cmap = plt.get_cmap("viridis")
    colour = {T: cmap(i / max(1, len(lengths) - 1) * 0.85) for i, T in enumerate(lengths)}
    runs: dict = {}  # one configuration across lengths
    for r in sorted(pts, key=lambda r: r["T"]):
        c = colour[r["T"]]
        face = c if r["causal"] else "none"
        ax.scatter(r["density"], r["vs_sdpa"], s=40, marker=MARKERS.get(r["mode"], "D"), c=[face], edgecolors=[c])
        runs.setdefault((r["mechanism"], r.get("pattern") or r["causal"], r["mode"]), []).append(r)
    for rs in runs.values():  # a thin line from the shortest length to the longest, named at the longest
        ax.plot([r["density"] for r in rs], [r["vs_sdpa"] for r in rs], color="lightgrey", lw=1, zorder=0)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    handles = [Line2D([], [], color="grey", ls="--", label="SDPA (above: faster)")]
    handles += [Line2D([], [], ls="", marker="o", color=colour[T], label=f"T = {T:,}") for T in lengths]
    modes = sorted({r["mode"] for r in pts})
    for mode in modes if len(modes) > 1 else ():  # one mode is named in the title
        handles.append(Line2D([], [], ls="", marker=MARKERS.get(mode, "D"), color="grey", label=mode))
    handles.append(Line2D([], [], ls="", marker="o", color="grey", label="causal (filled)"))
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="grey", label="full (hollow)"))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="density (allowed pairs / T²)",
        ylabel="speedup over SDPA (SDPA time / ours)",
        title="speedup over SDPA vs density" + (f", {modes[0]}" if len(modes) == 1 else ""),
    )
    _plain_log(ax.xaxis)
    _plain_log(ax.yaxis)
    _legend(ax, handles)
    _names(ax, [rs[-1] for rs in runs.values()])
    return fig


def _names(ax, rows: list[dict]) -> None:
    """Each row's mechanism beside its point, moved down a line while it would overprint a name
    already placed (positions in points, from the top of the plot down)."""
    ax.autoscale_view()
    to_points = 72 / ax.figure.dpi
    placed: list[tuple[float, float]] = []
    for r in sorted(rows, key=lambda r: -r["vs_sdpa"]):
        x, y = ax.transData.transform((r["density"], r["vs_sdpa"])) * to_points
        dy = 3.0
        while any(abs(x - px) < 60 and abs(y + dy - py) < 8 for px, py in placed):
            dy -= 8
        placed.append((x, y + dy))
        at = (r["density"], r["vs_sdpa"])
        ax.annotate(r["mechanism"], at, xytext=(4, dy), textcoords="offset points", fontsize=7)


def _legend(ax, handles=None) -> None:
    """A legend in a readable font, moved outside the axes when it would cover the data."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if len(handles) > CROWDED:
        ax.legend(handles=handles, fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.figure.set_figwidth(ax.figure.get_figwidth() + 3.5 / len(ax.figure.axes))  # room for it
    else:
        ax.legend(handles=handles, fontsize=LEGEND_FONT)

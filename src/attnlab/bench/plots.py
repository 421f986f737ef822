"""PNG plots of an efficiency run (matplotlib, the ``[viz]`` extra): latency vs length (log-log, one
line per mechanism and mask, SDPA dashed beside the rows that time SDPA itself), speedup vs density,
and peak memory vs length."""

from __future__ import annotations

from pathlib import Path


class PlotsUnavailable(RuntimeError):
    """matplotlib (the ``[viz]`` extra) is not installed: no plot can be drawn."""


def write(rows: list[dict], out: Path) -> list[Path]:
    """The three plots under ``out``; raises :class:`PlotsUnavailable` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable("plots skipped: matplotlib is not installed (pip install 'attnlab[viz]')") from e
    timed = [r for r in rows if r.get("median_ms") is not None]
    paths = []
    for mode in sorted({r["mode"] for r in timed}):
        fig, ax = plt.subplots(figsize=(7, 5))
        sel = [r for r in timed if r["mode"] == mode]
        for (name, causal), rs in _series(sel).items():
            mask = "causal" if causal else "full"
            line = ax.plot([r["T"] for r in rs], [r["median_ms"] for r in rs], marker="o", label=f"{name} ({mask})")
            sdpa = [(r["T"], r["median_ms"] * r["vs_sdpa"]) for r in rs if r.get("vs_sdpa")]
            if all(r.get("baseline") for r in rs) and sdpa:  # the rows that time SDPA itself
                ax.plot(*zip(*sdpa), ls="--", color=line[0].get_color(), label=f"SDPA ({mask})")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="median ms", title=f"latency, {mode}")
        ax.legend(fontsize=6, ncol=2)
        paths.append(_save(fig, out / f"latency_{mode.replace('+', '_')}.png"))
    fig, ax = plt.subplots(figsize=(6, 5))
    pts = [r for r in timed if r.get("density") and r.get("vs_sdpa")]
    ax.scatter([r["density"] for r in pts], [r["vs_sdpa"] for r in pts], s=12)
    for r in pts:
        ax.annotate(r["mechanism"], (r["density"], r["vs_sdpa"]), fontsize=5)
    ax.set(xscale="log", yscale="log", xlabel="density (allowed pairs / T^2)", ylabel="speedup over SDPA")
    paths.append(_save(fig, out / "speedup_vs_density.png"))
    fig, ax = plt.subplots(figsize=(7, 5))
    for (name, causal), rs in _series([r for r in timed if r.get("peak_mib") is not None]).items():
        ax.plot(
            [r["T"] for r in rs],
            [r["peak_mib"] for r in rs],
            marker="o",
            label=f"{name} ({'causal' if causal else 'full'})",
        )
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="peak MiB above baseline", title="memory")
    ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out / "memory.png"))
    return paths


def _series(rows: list[dict]) -> dict:
    out: dict = {}
    for r in sorted(rows, key=lambda r: r["T"]):
        out.setdefault((r["mechanism"], r["causal"]), []).append(r)
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Efficiency-suite analysis: CAB efficiency lengths on synthetic curves, run comparison, plots."""

import json

import pytest

from attnlab import cli
from attnlab.bench import analysis, plots


def test_crossing_of_a_quadratic_and_a_line():
    T = [1000.0, 2000.0, 4000.0, 8000.0]
    dense = [1e-6 * t * t for t in T]
    ours = [1e-3 * t for t in T]  # equal at T = 1000
    assert analysis.crossing(T, dense, ours) == pytest.approx(1000.0, rel=1e-6)
    offset = [1e-3 * t + 3.0 for t in T]  # 1e-6 T^2 = 1e-3 T + 3: T^2 - 1000 T - 3e6 = 0
    assert analysis.crossing(T, dense, offset) == pytest.approx((1000 + 13e6**0.5) / 2, rel=1e-6)
    # twice dense everywhere: the linear fit of a quadratic is overtaken only by extrapolation
    assert analysis.crossing(T, dense, [2 * d for d in dense]) > max(T)
    linear = [1e-3 * t for t in T]  # a "dense" that does not grow quadratically never loses to a slower line
    assert analysis.crossing(T, linear, [2 * x for x in linear]) is None
    assert analysis.crossing(T, dense, [0.1 * d for d in dense]) == 0.0  # wins at every length


def _row(name, T, ms, vs, causal=True, mode="fwd", **kw):
    return {
        "mechanism": name,
        "T": T,
        "causal": causal,
        "mode": mode,
        "options": "",
        "median_ms": ms,
        "vs_sdpa": vs,
        "density": kw.get("density", 0.1),
        "peak_mib": kw.get("peak", 1.0 * T / 1000),
        "sdpa_peak_mib": kw.get("sdpa_peak", 2.0 * T / 1000),
        "baseline": kw.get("baseline", False),
    }


def test_efficiency_lengths_from_rows():
    rows = []
    for T in (1000, 2000, 4000):
        dense_ms = 1e-6 * T * T
        rows.append(_row("w", T, 2e-3 * T, dense_ms / (2e-3 * T)))
        rows.append(_row("sdpa_itself", T, dense_ms, 1.0, baseline=True))
    (c,) = analysis.efficiency_lengths(rows)  # the baseline's own rows have no crossing
    assert c.mechanism == "w" and c.time_T == pytest.approx(2000, rel=1e-6) and c.in_range(c.time_T)
    assert c.memory_T == pytest.approx(0.0, abs=1e-6)  # half of SDPA's memory at every length
    assert c.exponent == pytest.approx(1.0, abs=1e-9)  # 2e-3 T: linear


def test_scaling_exponent_recovers_power_laws():
    T = [1024.0, 4096.0, 16384.0]
    assert analysis.scaling_exponent(T, [3e-5 * t**1.5 for t in T]) == pytest.approx(1.5, abs=1e-9)
    assert analysis.scaling_exponent(T, [1e-7 * t * t for t in T]) == pytest.approx(2.0, abs=1e-9)
    # a fixed cost on top of a quadratic bends the slope below 2 over short lengths
    assert 1.0 < analysis.scaling_exponent(T, [1 + 1e-7 * t * t for t in T]) < 1.95
    assert analysis.scaling_exponent([4096.0], [1.0]) is None


def _write(tmp_path, name, rows):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"machine": {}, "gate": {}, "rows": rows}))
    return folder


def test_compare_flags_a_regression_and_cli_exit_codes(tmp_path, capsys):
    a = _write(tmp_path, "a", [_row("w", 1024, 10.0, 4.0), _row("x", 1024, 10.0, 2.0)])
    b = _write(tmp_path, "b", [_row("w", 1024, 20.0, 2.0), _row("x", 1024, 10.0, 2.1)])
    rows = {r["mechanism"]: r for r in analysis.compare(analysis.load(a), analysis.load(b))}
    assert rows["w"]["regressed"] and rows["w"]["time_ratio"] == 2.0 and not rows["x"]["regressed"]
    assert cli.main(["bench", "--compare", str(a), str(b)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cli.main(["bench", "--compare", str(a), str(a)]) == 0
    assert cli.main(["bench", "--compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert cli.main(["bench", "compare", str(a), str(b)]) == 1  # the subcommand, same exit codes
    assert cli.main(["bench", "compare", str(a), str(a)]) == 0
    assert cli.main(["bench", "compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err
    lone = _write(tmp_path, "lone", [_row("y", 1024, 10.0, 2.0)])
    assert cli.main(["bench", "compare", str(a), str(lone)]) == 2
    assert capsys.readouterr().err.startswith("attnlab bench: error: no timed configuration is common")


def test_compare_takes_the_latest_run_of_an_out_folder(tmp_path, capsys):
    """``--compare`` given the folders passed to ``--out``: each one's newest timestamped run is used,
    and named. Here only the newest runs differ (a regression); the older ones agree."""
    for out, old_vs, new_vs in (("out_a", 2.0, 4.0), ("out_b", 2.0, 2.0)):
        (tmp_path / out).mkdir()
        _write(tmp_path / out, "20260101-090000", [_row("w", 1024, 10.0, old_vs)])
        _write(tmp_path / out, "20260102-120000", [_row("w", 1024, 10.0, new_vs)])
    (tmp_path / "out_a" / "notes").mkdir()  # a folder without results.json is not a run
    a, b = tmp_path / "out_a", tmp_path / "out_b"
    assert cli.main(["bench", "--compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert f"A: the latest run in {a}: 20260102-120000" in out and f"B: the latest run in {b}" in out
    assert "REGRESSION" in out
    # A run folder or its results.json is taken as it is, without a note.
    old = a / "20260101-090000"
    assert cli.main(["bench", "compare", str(old), str(b / "20260101-090000" / "results.json")]) == 0
    assert "latest run" not in capsys.readouterr().out
    assert analysis.run_file(a) == (a / "20260102-120000" / "results.json", True)
    (tmp_path / "empty").mkdir()
    assert cli.main(["bench", "compare", str(a), str(tmp_path / "empty")]) == 2
    assert "no results.json at" in capsys.readouterr().err


def test_plots_are_written(tmp_path):
    rows = [_row(n, T, 1e-3 * T, 2.0) for n in ("dense", "w") for T in (1000, 2000)]
    paths = plots.write(rows, tmp_path)
    assert [p.name for p in paths] == ["latency_fwd.png", "speedup_vs_density.png", "memory.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def _sweep(lengths, modes=("fwd",)):
    """A run as the suite writes it: SDPA's own row (baseline) and a windowed one, both masks."""
    rows = []
    for T in lengths:
        for mode in modes:
            for causal in (True, False):
                sdpa_ms = 1e-6 * T * T
                rows.append(_row("dense", T, sdpa_ms, 1.0, causal, mode, baseline=True, density=0.5))
                w = _row("sliding_window", T, 2e-3 * T, sdpa_ms / (2e-3 * T), causal, mode, density=512 / T)
                rows.append({**w, "options": "window=512"})
    return rows


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_latency_plot_has_an_sdpa_baseline_and_options_in_the_legend():
    figs = plots.figures(_sweep((1024, 2048, 4096), modes=("fwd", "fwd+bwd")))
    assert list(figs) == ["latency_fwd.png", "latency_fwd_bwd.png", "speedup_vs_density.png", "memory.png"]
    (ax,) = figs["latency_fwd.png"].axes
    lines = _lines(ax)
    # SDPA's time per length is median_ms * vs_sdpa of the rows; SDPA's own rows are that line, not a series
    assert list(lines["SDPA, causal"].get_xdata()) == [1024, 2048, 4096]
    assert lines["SDPA, causal"].get_ydata() == pytest.approx([1e-6 * T * T for T in (1024, 2048, 4096)])
    assert lines["SDPA, causal"].get_color() == "black"
    window = lines["sliding_window, causal (window=512)"]
    assert window.get_ydata() == pytest.approx([2e-3 * T for T in (1024, 2048, 4096)])
    assert window.get_color() != lines["sliding_window, full (window=512)"].get_color() or (
        window.get_linestyle() != lines["sliding_window, full (window=512)"].get_linestyle()
    )
    assert not any(label.startswith("dense") for label in lines)
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_title().startswith("latency, fwd")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "sliding_window, causal (window=512)" in legend and "SDPA, full" in legend
    assert ax.get_legend().get_texts()[0].get_fontsize() >= 8
    memory = figs["memory.png"]
    assert [a.get_title() for a in memory.axes] == [f"peak memory, {m} (SDPA in black)" for m in ("fwd", "fwd+bwd")]
    sdpa_mem = _lines(memory.axes[0])["SDPA, causal"]
    assert sdpa_mem.get_ydata() == pytest.approx([2.0 * T / 1000 for T in (1024, 2048, 4096)])


def test_speedup_plot_has_a_line_at_one_a_title_and_colours_by_length_mode_and_mask():
    import matplotlib.colors as mcolors

    figs = plots.figures(_sweep((1024, 4096), modes=("fwd", "fwd+bwd")))
    (ax,) = figs["speedup_vs_density.png"].axes
    (one,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(one.get_ydata()) == [1, 1] and ax.get_title().startswith("speedup over SDPA")
    joins = [line for line in ax.get_lines() if line is not one]  # a configuration from 1K to 4K
    # density 512/T of the window from T=1024 to 4096, and dense's 0.5, for 2 masks x 2 modes each
    assert sorted(tuple(line.get_xdata()) for line in joins) == [(0.5, 0.125)] * 4 + [(0.5, 0.5)] * 4
    assert sorted(t.get_text() for t in ax.texts) == ["dense"] * 4 + ["sliding_window"] * 4  # one name each
    points = ax.collections  # one scatter per row: 2 lengths x 2 modes x 2 masks x 2 mechanisms
    assert len(points) == 16
    edges = {mcolors.to_hex(p.get_edgecolors()[0]) for p in points}
    assert len(edges) == 2  # one colour per length
    hollow = [p for p in points if len(p.get_facecolors()) == 0 or p.get_facecolors()[0][3] == 0]
    assert len(hollow) == 8  # the full-mask points
    shapes = {tuple(map(tuple, p.get_paths()[0].vertices.round(3))) for p in points}
    assert len(shapes) == 2  # one marker per mode
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"T = 1,024", "T = 4,096", "fwd", "fwd+bwd", "causal (filled)", "full (hollow)"} <= set(legend)


def test_a_single_length_is_drawn_as_bars_not_one_dot_on_a_log_plot():
    figs = plots.figures(_sweep((2048,)))
    (ax,) = figs["latency_fwd.png"].axes
    assert ax.get_lines() == [] and ax.get_xscale() == "linear"
    bars = {c.get_label(): c.patches[0].get_height() for c in ax.containers}  # one BarContainer per bar
    sdpa_ms = 1e-6 * 2048 * 2048
    assert bars == pytest.approx(
        {
            "SDPA, causal": sdpa_ms,
            "SDPA, full": sdpa_ms,
            "sliding_window, causal (window=512)": 2e-3 * 2048,
            "sliding_window, full (window=512)": 2e-3 * 2048,
        }
    )
    (mem,) = figs["memory.png"].axes
    assert mem.get_lines() == [] and len(mem.patches) == 4


def test_plots_without_matplotlib_raise_a_specific_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plots.PlotsUnavailable, match="matplotlib is not installed"):
        plots.write([_row("w", 1000, 1.0, 2.0)], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pattern_sweep_runs_every_longca_pattern_through_the_cli(tmp_path):
    from attnlab.bench.workloads import PATTERNS

    assert cli.main(["bench", "--patterns", "all", "--lengths", "128", "--modes", "fwd", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["pattern"] for r in rows] == list(PATTERNS)
    assert all(r["median_ms"] is not None and 0 < r["density"] <= 1 for r in rows)
    dense = {r["pattern"]: r["density"] for r in rows}
    assert dense["full"] == 1.0 and dense["document"] < dense["causal"]


def test_cpu_probe_sees_the_tensors_a_call_holds_even_on_reused_pages():
    """The CPU probe counts the bytes of the call's tensors: the oracle's T x S weights show, the
    executor's linear memory shows as such, and a second identical call reads the same (pages an
    earlier call left resident, which an RSS probe cannot see, do not hide it)."""
    import torch

    import attnlab
    from attnlab.bench import measure

    T, H = 512, 4
    q = torch.randn(1, H, T, 32)
    probe = measure.peak_memory("cpu")
    assert isinstance(probe, measure.PeakCPU)
    peaks = {}
    for impl in ("reference", "auto", "auto", "auto"):  # the first auto call also builds the layout
        with measure.peak_memory("cpu") as probe:
            attnlab.attention(q, q, q, "sliding_window", causal=True, window=64, impl=impl)
        peaks.setdefault(impl, []).append(probe.peak)
    weights = H * T * T * 4  # one fp32 T x S map per head
    assert peaks["reference"][0] >= weights
    out = H * T * 32 * 4
    assert all(out <= p < weights / 4 for p in peaks["auto"])
    assert peaks["auto"][2] == peaks["auto"][1]


def test_probes_time_a_call_and_see_its_memory():
    import mmap
    import time

    from attnlab.bench import measure

    assert 0.02 <= measure.elapsed(lambda: time.sleep(0.02), "cpu") < 1.0
    probe = measure.PeakRSS()
    with probe:
        # Fresh pages straight from the OS: a malloc'd tensor may reuse pages an earlier test left
        # resident, which an RSS probe rightly cannot see.
        x = mmap.mmap(-1, 64 << 20)
        x.write(b"\1" * (64 << 20))  # 64 MiB, touched
        time.sleep(0.01)
        x.close()
    assert probe.peak is not None and probe.peak >= 32 << 20


def test_kernel_ceiling_rows_describe_the_same_work():
    from attnlab.bench.figures import ceiling

    rows = ceiling.ceiling(T=256, keys=64, heads=2, dim=16, rows=(32, 64), repeats=1)
    assert [r["rows"] for r in rows] == [32, 64] and [r["tiles"] for r in rows] == [16, 8]
    for r in rows:  # ideal = SDPA time x (keys per row) / (T / 2), whatever the tile height
        assert r["ideal_ms"] == pytest.approx(r["sdpa_ms"] * 64 / 128)
        assert r["of_ideal"] == pytest.approx(r["ideal_ms"] / r["kernel_ms"]) and r["kernel_ms"] > 0

"""The CLI: list, check, and a tiny bench run that writes its JSON."""

import json

from attnlab import cli


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sliding_window" in out and "defaults: window=512" in out and "self_causal" in out


def test_list_doc_prints_the_module_docstring_then_the_record(capsys):
    import attnlab

    assert cli.main(["list", "--doc", "sliding_window"]) == 0
    out = capsys.readouterr().out
    doc = attnlab.mechanisms.sliding_window.__doc__
    assert out.startswith("sliding_window  (attnlab.mechanisms.sliding_window)\n\nSliding-window (local band)")
    assert "Query row i sits at key position p = i + S - T" in out and doc.splitlines()[0] in out  # the exact rule
    record = out[out.index("record (attnlab.get('sliding_window')):") :]
    for line in ("kind:        mask", "has_lse:     yes", "drop_in:     yes", "defaults:    window=512"):
        assert f"  {line}\n" in record
    assert "  impls:       auto, reference, blocksparse\n" in record
    assert cli.main(["list", "--doc", "linear"]) == 0
    out = capsys.readouterr().out
    assert "kind:        linear" in out and "has_lse:     no (" in out and "fixed_state: yes" in out


def test_list_doc_finds_every_mechanisms_module(capsys):
    import attnlab

    for name in attnlab.names():
        assert cli.module_of(attnlab.get(name)).SPEC is attnlab.get(name)
    import pytest

    with pytest.raises(SystemExit) as e:
        cli.main(["list", "--doc", "slidng_window"])
    assert e.value.code == 2 and "invalid choice: 'slidng_window'" in capsys.readouterr().err


def test_list_plot_writes_the_defaults_picture(tmp_path, capsys):
    assert cli.main(["list", "--plot", "sliding_window", "--out", str(tmp_path), "--length", "256"]) == 0
    path = tmp_path / "sliding_window_mask.png"
    assert capsys.readouterr().out == f"{path}\n" and path.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["list", "--plot", "halo", "--out", str(tmp_path)]) == 0  # the defaults need a grid shape
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'halo_mask.png'}  (the defaults need a shape (halo needs shape=(H, W)")
    assert "drew example(64)" in out and (tmp_path / "halo_mask.png").stat().st_size > 0
    assert cli.main(["list", "--plot", "block_topk", "--out", str(tmp_path)]) == 0  # no fixed mask: a selection
    assert "the selection of a seeded random input" in capsys.readouterr().out
    assert (tmp_path / "block_topk_selection.png").stat().st_size > 0
    assert cli.main(["list", "--plot", "span_search", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab list: error: cannot plot span_search:") and err.count("\n") == 1
    assert cli.main(["list", "--plot", "dense", "--length", "0"]) == 2
    assert "--length must be positive" in capsys.readouterr().err


def test_check_passes_and_reports(capsys):
    assert cli.main(["check", "sliding_window", "halo"]) == 0
    out = capsys.readouterr().out
    assert "PASS  sliding_window" in out and "2 passed, 0 failed" in out


def test_bench_writes_results(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--mechanisms",
            "sliding_window",
            "dense",
            "--lengths",
            "256",
            "--modes",
            "fwd",
            "--flex",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    (run,) = tmp_path.iterdir()
    data = json.loads((run / "results.json").read_text())
    rows = data["rows"]
    assert {r["mechanism"] for r in rows} == {"sliding_window", "dense"} and data["machine"]["torch"]
    assert all(r["median_ms"] > 0 and r["vs_sdpa"] > 0 and 0 < r["density"] <= 1 for r in rows)
    assert {r["mechanism"] for r in rows if r["baseline"]} == {"dense"}  # the row that times SDPA itself
    assert (run / "results.csv").exists()


def test_bench_masks_option_selects_patterns(tmp_path):
    args = ["bench", "--mechanisms", "sliding_window", "--lengths", "128", "--modes", "fwd", "--masks", "causal"]
    assert cli.main([*args, "--flex", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["causal"] for r in rows] == [True]


def test_bad_bench_input_exits_with_one_line_and_no_traceback(tmp_path, capsys):
    import pytest

    from attnlab import cli

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["bench", "--mechanisms", "dense", "--lengths", "64", "--out", str(blocker / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab bench: error: cannot write results") and "\n" not in err
    assert cli.main(["bench", "--lengths", "0", "--out", str(tmp_path)]) == 2
    assert "--lengths must be positive" in capsys.readouterr().err
    for argv in (["bench", "--mechanisms", "nope"], ["bench", "--lengths"], ["bench", "--mechanisms"]):
        with pytest.raises(SystemExit) as e:  # one error line, exit 2
            cli.main(argv)
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_bench_device_cuda_without_cuda_is_one_line_error(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for builds that see none")
    for suite in ("efficiency", "quality"):
        assert cli.main(["bench", "--suite", suite, "--device", "cuda", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "attnlab bench: error: --device cuda was asked for, but this torch build sees no CUDA device"


def test_bench_records_the_device_it_timed_on(tmp_path):
    args = ["bench", "--mechanisms", "dense", "--lengths", "64", "--modes", "fwd", "--masks", "causal", "--flex"]
    assert cli.main([*args, "--device", "auto", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    import torch

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((run / "results.json").read_text())["machine"]["device"] == want


def _raise_at(monkeypatch, name: str, min_T: int):
    """Make ``name``'s only fast path raise for queries of length >= min_T (the gate's tiny shapes
    stay below it unless min_T is 0), as a device bug at benchmark sizes would."""
    from attnlab import registry

    mech = registry.get(name)
    (impl_name, impl) = next(iter(mech.impls.items()))

    def broken(q, k, v, **kw):
        if q.shape[2] >= min_T:
            raise RuntimeError("boom on this device")
        return impl.fn(q, k, v, **kw)

    monkeypatch.setitem(mech.impls, impl_name, registry.Impl(broken, impl.supports))


def test_check_reports_every_failing_mechanism_and_goes_on(monkeypatch, capsys):
    _raise_at(monkeypatch, "streaming", 0)
    code = cli.main(["check", "--mechanisms", "streaming", "sliding_window", "--dtypes", "fp32"])
    assert code == 1
    out = capsys.readouterr().out
    fail = next(line for line in out.splitlines() if line.startswith("FAIL  streaming"))
    assert "RuntimeError: boom on this device" in fail and "(16/16 cases failed)" in fail
    assert "PASS  sliding_window  (16 cases" in out  # the mechanism after the failure still ran
    summary = {line.split()[0]: line.split()[1:] for line in out[out.index("\nmechanism ") :].splitlines()[2:-1]}
    assert summary["streaming"][:5] == ["FAIL", "16", "16", "16", "fail"]
    assert summary["sliding_window"][:4] == ["PASS", "16", "0", "ok"]
    assert out.endswith("1 passed, 1 failed\n")


def test_check_device_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for builds that see none")
    assert cli.main(["check", "--device", "cuda", "dense"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err == "attnlab check: error: --device cuda was asked for, but this torch build sees no CUDA device\n"
    )
    assert captured.out == ""
    assert cli.main(["check", "halo", "--device", "auto", "--dtypes", "fp64"]) == 0  # auto: the CPU here
    assert "contract on cpu (float64)" in capsys.readouterr().out


def _gate(monkeypatch, verdicts: dict) -> None:
    """Stand in for the correctness gate (the contract has tests of its own) with fixed verdicts."""
    from attnlab.bench import efficiency

    monkeypatch.setattr(efficiency, "gate", lambda names, device: {n: verdicts[n] for n in names})


def test_bench_gate_failure_is_an_error_row_with_the_first_problem(monkeypatch, tmp_path, capsys):
    _gate(monkeypatch, {"dense": [], "halo": ["blocksparse-float32-full-T37-S37-H2kv2: out: max abs error 1"]})
    args = ["bench", "--mechanisms", "halo", "dense", "--lengths", "64", "--modes", "fwd", "--masks", "full"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 1
    (run,) = tmp_path.iterdir()
    rows = {r["mechanism"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
    assert rows["halo"]["status"] == "error" and rows["halo"]["median_ms"] is None
    assert rows["halo"]["error"].startswith("failed the correctness gate (1 cases): blocksparse-float32")
    assert rows["dense"]["status"] == "ok" and rows["dense"]["median_ms"] > 0
    assert "ERROR halo T=64 full fwd: failed the correctness gate" in capsys.readouterr().out


def test_bench_records_a_raising_mechanism_as_an_error_row_and_goes_on(monkeypatch, tmp_path, capsys):
    import csv

    _raise_at(monkeypatch, "sliding_window", 128)
    _gate(monkeypatch, {"dense": [], "sliding_window": []})
    args = ["bench", "--mechanisms", "sliding_window", "dense", "--lengths", "128", "--modes", "fwd"]
    assert cli.main([*args, "--masks", "causal", "--out", str(tmp_path)]) == 1  # a failed row: status 1
    out = capsys.readouterr().out
    assert "ERROR sliding_window T=128 causal fwd: RuntimeError: boom on this device" in out
    assert "1 of 2 rows failed" in out
    (run,) = tmp_path.iterdir()
    rows = {r["mechanism"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
    bad, good = rows["sliding_window"], rows["dense"]
    assert bad["status"] == "error" and bad["error"] == "RuntimeError: boom on this device"
    assert bad["median_ms"] is None and bad["vs_sdpa"] is None  # no speed for a path that failed
    assert good["status"] == "ok" and good["median_ms"] > 0 and good["vs_sdpa"] > 0
    with open(run / "results.csv") as f:
        by_name = {r["mechanism"]: r for r in csv.DictReader(f)}
    assert by_name["sliding_window"]["error"] == "RuntimeError: boom on this device"
    assert by_name["dense"]["status"] == "ok"


def test_bench_reports_the_first_call_apart_from_the_steady_median(monkeypatch, tmp_path):
    """A path whose first call at the bench size pays a one-time cost (as compiling does) shows it
    in first_ms, not in the median."""
    import time

    from attnlab import registry

    mech = registry.get("sliding_window")
    impl = mech.impls["blocksparse"]
    calls = []

    def compiles_once(q, k, v, **kw):
        if q.shape[2] == 128:  # the benchmark's length; the correctness gate's shapes are smaller
            if not calls:
                time.sleep(0.3)
            calls.append(1)
        return impl.fn(q, k, v, **kw)

    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(compiles_once, impl.supports))
    _gate(monkeypatch, {"sliding_window": []})
    args = ["bench", "--mechanisms", "sliding_window", "--lengths", "128", "--modes", "fwd", "--masks", "causal"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    (row,) = json.loads((run / "results.json").read_text())["rows"]
    assert row["first_ms"] >= 300 and row["first_ms"] >= row["median_ms"]
    assert row["median_ms"] < 300 and len(calls) > 3


def test_interrupted_runs_keep_what_they_measured(monkeypatch, tmp_path, capsys):
    """Ctrl-C (or `timeout -s INT`, as scripts/gpu_check.sh stops a step) still writes the finished
    rows and summarizes the finished mechanisms, with exit status 130."""
    import torch

    from attnlab import registry

    mech = registry.get("sliding_window")
    impl = mech.impls["blocksparse"]

    def interrupted(q, k, v, **kw):
        if q.shape[2] >= 128 or q.dtype == torch.float32:
            raise KeyboardInterrupt
        return impl.fn(q, k, v, **kw)

    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(interrupted, impl.supports))
    assert cli.main(["check", "halo", "sliding_window", "--dtypes", "fp32"]) == 130
    out = capsys.readouterr().out
    assert "PASS  halo" in out and "interrupted during sliding_window; 1 mechanism(s) not checked" in out
    assert out.endswith("1 passed, 0 failed (partial)\n")
    _gate(monkeypatch, {"dense": [], "sliding_window": []})
    args = ["bench", "--mechanisms", "dense", "sliding_window", "--lengths", "128", "--modes", "fwd"]
    assert cli.main([*args, "--masks", "causal", "--out", str(tmp_path)]) == 130
    assert "interrupted after 1 of 2 rows" in capsys.readouterr().out
    (run,) = tmp_path.iterdir()
    data = json.loads((run / "results.json").read_text())
    assert [r["mechanism"] for r in data["rows"]] == ["dense"] and data["machine"]["interrupted"]


def test_bench_subcommands_and_the_old_spellings_map_onto_each_other():
    """`attnlab bench` is three subcommands; the old flat spelling keeps working, mapped before parsing."""
    from attnlab.bench.commands import legacy_bench as legacy

    assert legacy([]) == ["efficiency"]
    assert legacy(["--lengths", "64"]) == ["efficiency", "--lengths", "64"]
    assert legacy(["--suite", "quality", "--smoke"]) == ["quality", "--smoke"]
    assert legacy(["--smoke", "--suite=quality"]) == ["quality", "--smoke"]
    assert legacy(["--suite", "efficiency", "--modes", "fwd"]) == ["efficiency", "--modes", "fwd"]
    assert legacy(["--compare", "a", "b"]) == ["compare", "a", "b"]
    for new in (["efficiency", "--lengths", "64"], ["quality"], ["compare", "a", "b"], ["--help"]):
        assert legacy(new) == new  # the new spelling passes through untouched


def test_bench_efficiency_old_and_new_spelling_time_the_same_rows(monkeypatch, tmp_path):
    _gate(monkeypatch, {"sliding_window": []})
    args = ["--mechanisms", "sliding_window", "--lengths", "128", "--modes", "fwd", "--masks", "causal"]
    keys = []
    spellings = (["bench", *args], ["bench", "efficiency", *args], ["bench", "--suite", "efficiency", *args])
    for i, argv in enumerate(spellings):
        assert cli.main([*argv, "--out", str(tmp_path / str(i))]) == 0
        (run,) = (tmp_path / str(i)).iterdir()
        (row,) = json.loads((run / "results.json").read_text())["rows"]
        keys.append((row["mechanism"], row["T"], row["causal"], row["mode"], row["options"], row["status"]))
    assert keys == [("sliding_window", 128, True, "fwd", "window=512", "ok")] * 3


def test_bench_subcommands_take_only_their_own_flags(capsys):
    import pytest

    assert cli.main(["bench", "quality", "--lengths", "64"]) == 2
    err = capsys.readouterr().err
    assert err == "attnlab bench: error: --lengths applies to the efficiency suite (attnlab bench efficiency)\n"
    assert cli.main(["bench", "efficiency", "--tasks", "T1"]) == 2
    assert "--tasks applies to the quality suite" in capsys.readouterr().err
    assert cli.main(["bench", "compare", "a", "b", "--preset", "quick"]) == 2
    assert "--preset applies to the efficiency and quality suites" in capsys.readouterr().err
    for argv in (["bench", "efficiency", "--bogus"], ["bench", "compare", "a"], ["check", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_bench_threads_are_set_once_per_run(monkeypatch, tmp_path):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _gate(monkeypatch, {"sliding_window": []})
    args = ["--mechanisms", "sliding_window", "--lengths", "64", "--modes", "fwd", "--masks", "causal"]
    assert cli.main(["bench", "efficiency", *args, "--threads", "1", "--out", str(tmp_path)]) == 0
    assert calls == [1]
    assert cli.main(["bench", "efficiency", *args, "--out", str(tmp_path)]) == 0  # 0: torch's own
    assert calls == [1]


def test_bench_threads_must_be_a_positive_int(capsys):
    """Not torch's traceback for -3, nor a silent default for 0: one line naming --threads, exit 2."""
    import pytest

    for argv in (["efficiency", "--threads", "-3"], ["quality", "--threads", "0"], ["--threads", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "argument --threads: must be a positive int" in err


def test_the_sdpa_baseline_comes_from_the_records():
    """The mechanism whose fast path *is* SDPA: a mask mechanism whose first impl is SDPA; a composite
    that calls SDPA and gates the result (moh) computes something else."""
    from attnlab import registry
    from attnlab.bench.workloads import is_sdpa_baseline

    assert [m.name for m in registry.MECHANISMS if is_sdpa_baseline(m)] == ["dense"]
    assert next(iter(registry.get("moh").impls)) == "sdpa" and not is_sdpa_baseline(registry.get("moh"))


def test_a_baseline_that_cannot_run_leaves_its_reason_in_the_row(monkeypatch, tmp_path):
    _gate(monkeypatch, {"sliding_window": []})
    args = ["bench", "efficiency", "--mechanisms", "sliding_window", "--lengths", "64", "--modes", "fwd+bwd"]
    assert cli.main([*args, "--masks", "causal", "--flex", "sliding_window", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    (row,) = json.loads((run / "results.json").read_text())["rows"]
    assert row["status"] == "ok" and row["median_ms"] > 0 and row["vs_flex"] is None
    assert "flex: forward only on the CPU" in row["note"]


def _table_cells(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and the body rows of the rich table that ``bench`` prints."""
    split = lambda line, bar: [c.strip() for c in line.strip().strip(bar).split(bar)]  # noqa: E731
    (header,) = [split(line, "┃") for line in out.splitlines() if line.startswith("┃")]
    return header, [split(line, "│") for line in out.splitlines() if line.startswith("│")]


def test_bench_table_has_an_options_column_and_memory_in_a_unit_that_fits(capsys):
    import torch

    from attnlab.bench import efficiency, report

    short = efficiency._short
    base = {"mechanism": "x", "T": 1024, "causal": True, "mode": "fwd", "status": "ok", "options": ""}
    rows = [
        {**base, "mechanism": "sliding_window", "options": "window=512", "peak_mib": 0.3},  # a small run
        {**base, "mechanism": "document", "options": f"lengths={short(tuple(range(100, 130)))}"},
        {**base, "mechanism": "region", "options": f"groups={short(torch.zeros(1024))}, rules={short(torch.eye(9))}"},
    ]
    report.table(rows, {"cpu": "test", "threads": 1, "torch": torch.__version__})
    header, body = _table_cells(capsys.readouterr().out)
    cell = {r[0]: dict(zip(header, r)) for r in body}
    assert cell["sliding_window"]["options"] == "window=512"
    assert cell["sliding_window"]["peak mem"] == "307 KiB"  # 0.3 MiB: "0" in whole MiB
    assert cell["document"]["options"] == "lengths=(100, 101, …, 129; n=30)"  # a long tuple by its ends
    assert cell["region"]["options"] == "groups=tensor[1024], rules=tens…"  # tensors by shape, cut at 32
    assert cell["document"]["peak mem"] == "-"
    assert [report.memory(m) for m in (1e-6, 0.0039, 3.5, 99.5, 1500.0)] == [
        "1 B",
        "3.99 KiB",
        "3.50 MiB",
        "99.5 MiB",
        "1.46 GiB",
    ]


def test_bench_run_prints_options_and_memory_as_written(tmp_path, capsys):
    from attnlab.bench import report

    args = ["bench", "--mechanisms", "sliding_window", "--lengths", "128", "--modes", "fwd", "--masks", "causal"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    header, (cells,) = _table_cells(capsys.readouterr().out)
    (run,) = tmp_path.iterdir()
    (row,) = json.loads((run / "results.json").read_text())["rows"]
    cell = dict(zip(header, cells))
    assert cell["options"] == row["options"] and row["options"].startswith("window=")
    assert cell["peak mem"] == ("-" if row["peak_mib"] is None else report.memory(row["peak_mib"]))

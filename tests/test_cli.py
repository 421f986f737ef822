"""The CLI: list, check, and a tiny bench run that writes its JSON."""

import json

from attnlab import cli


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sliding_window" in out and "defaults: window=512" in out and "self_causal" in out


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

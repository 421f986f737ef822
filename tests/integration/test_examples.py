"""Every script in examples/ runs to the end, alone, within a time limit. The scripts check their own
claims with assertions (a mechanism against its oracle, reuse against the reference under the reused
mask, generation against eager), so a run that exits 0 means those claims held."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS = {"hf_llama.py": "transformers"}
TIMEOUT_S = 300  # each takes seconds on a quiet CPU; the margin is for a shared 2-core machine


def test_there_are_four_to_six_examples():
    assert 4 <= len(EXAMPLES) <= 6, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_short_and_documented(script):
    text = script.read_text()
    assert len(text.splitlines()) < 60, f"{script.name} should stay under 60 lines"
    assert text.startswith('"""') and "python examples/" in text, "a docstring saying what it shows and how to run it"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script):
    if script.name in NEEDS and importlib.util.find_spec(NEEDS[script.name]) is None:
        pytest.skip(f"needs {NEEDS[script.name]}")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": os.environ.get("ATTNLAB_TEST_THREADS", "2"),
    }
    run = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "an example prints what it shows"

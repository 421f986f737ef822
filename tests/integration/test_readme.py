"""Every Python block in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block):
    namespace: dict = {}
    for previous in BLOCKS[: BLOCKS.index(block)]:  # later blocks reuse names from earlier ones
        exec(previous, namespace)
    exec(block, namespace)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make bench" in text

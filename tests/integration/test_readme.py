"""Every Python block in the README runs as written, alone: each in a fresh namespace, so a block that
leans on an earlier block's imports or tensors fails here (a reader copies one block, not the page)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_alone(block):
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_has_the_commands():
    text = README.read_text()
    for command in ("make test", "make test-quick", "make bench", "download.pytorch.org/whl/cpu"):
        assert command in text, command

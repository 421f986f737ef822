"""One home per mechanism: tests/mechanisms/ holds exactly one ``test_<name>.py`` per registered
mechanism, so a new record without tests, or a file left behind by a renamed or removed
mechanism, fails here."""

import pathlib

import attnlab

HERE = pathlib.Path(__file__).parent
META = pathlib.Path(__file__).name


def problems(folder: pathlib.Path, names: list[str]) -> list[str]:
    """What breaks the one-file-per-mechanism rule in ``folder`` for the registered ``names``."""
    files = {p.stem.removeprefix("test_"): p for p in folder.glob("test_*.py") if p.name != META}
    out = [f"{n}: no test_{n}.py" for n in names if n not in files]
    out += [f"{p.name}: names no registered mechanism" for n, p in sorted(files.items()) if n not in names]
    # the file must exercise its mechanism by name, e.g. attnlab.attention(..., "<name>")
    quiet = [(n, p) for n, p in sorted(files.items()) if n in names and f'"{n}"' not in p.read_text()]
    out += [f"{p.name}: never calls {n!r}" for n, p in quiet]
    return out


def test_every_registered_mechanism_has_exactly_its_own_file():
    assert problems(HERE, attnlab.registry.mechanisms()) == []


def test_the_rule_catches_a_missing_a_stray_and_an_empty_file(tmp_path):
    (tmp_path / "test_dense.py").write_text('attnlab.attention(q, k, v, "dense")\n')
    (tmp_path / "test_halo.py").write_text("def test_nothing():\n    pass\n")
    (tmp_path / "test_sliding_windw.py").write_text('"sliding_window"\n')  # a typo'd name
    (tmp_path / "helpers.py").write_text("")  # not a test file: ignored
    assert problems(tmp_path, ["dense", "halo", "sliding_window"]) == [
        "sliding_window: no test_sliding_window.py",
        "test_sliding_windw.py: names no registered mechanism",
        "test_halo.py: never calls 'halo'",
    ]

"""``attnlab.mechanisms`` is the package of mechanism modules; ``attnlab.names()`` lists the names.

The names function used to be re-exported as ``attnlab.mechanisms`` and shadowed the package, so
``import attnlab.mechanisms.block_topk`` failed and ``help()`` could not reach a mechanism's module.
"""

import importlib
import pydoc
import warnings

import pytest

import attnlab
from attnlab import registry


def test_names_lists_the_registry_in_order():
    assert attnlab.names() == [m.name for m in registry.MECHANISMS] == registry.mechanisms()
    assert "names" in attnlab.__all__ and "mechanisms" not in attnlab.__all__


def test_the_issue_imports_reach_the_mechanism_modules():
    import attnlab.mechanisms.block_topk as bt

    assert bt is importlib.import_module("attnlab.mechanisms.block_topk") and bt.SPEC is attnlab.get("block_topk")
    sw = attnlab.mechanisms.sliding_window
    assert sw.SPEC is attnlab.get("sliding_window")
    assert "Longformer" in sw.__doc__  # the paper, as help() shows it
    assert "Longformer" in pydoc.render_doc(attnlab.mechanisms.sliding_window)
    # a module the registry does not import is an attribute all the same; a typo is not
    assert attnlab.mechanisms.care.__name__ == "attnlab.mechanisms.care"
    with pytest.raises(AttributeError, match="no attribute 'slidng_window'"):
        attnlab.mechanisms.slidng_window  # noqa: B018


def test_every_record_is_the_spec_of_a_module_in_the_package():
    modules = {m.SPEC.name: m for m in map(importlib.import_module, _module_names()) if hasattr(m, "SPEC")}
    assert {n: modules[n].SPEC for n in attnlab.names()} == {m.name: m for m in registry.MECHANISMS}


def _module_names() -> list[str]:
    import pkgutil

    return [f"attnlab.mechanisms.{m.name}" for m in pkgutil.iter_modules(attnlab.mechanisms.__path__)]


def test_the_old_call_warns_and_returns_the_same_names():
    with pytest.warns(DeprecationWarning, match=r"attnlab\.mechanisms\(\) is deprecated.*use attnlab\.names\(\)") as w:
        got = attnlab.mechanisms()
    assert got == attnlab.names()
    assert w[0].filename == __file__  # points at the caller's line, not at attnlab
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnlab.names()  # the new name is silent


def test_the_issue_lines_run_in_a_fresh_interpreter():
    """As the user typed them, before anything else imported attnlab; no deprecation on the way, and
    no matplotlib (the viz extra) pulled in by ``import attnlab``."""
    import subprocess
    import sys

    code = (
        "import attnlab.mechanisms.block_topk as bt, attnlab, pydoc\n"
        "assert bt.SPEC.name == 'block_topk'\n"
        "import sys; assert 'matplotlib' not in sys.modules  # attnlab.plot draws with it, imported lazily\n"
        "assert 'Longformer' in pydoc.render_doc(attnlab.mechanisms.sliding_window)\n"
        "assert 'attnlab.names()' in pydoc.render_doc(attnlab.mechanisms)\n"
    )
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=True)

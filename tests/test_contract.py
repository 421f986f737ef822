"""The contract, over every registered mechanism x impl x dtype x CAB pattern x MHA/GQA x odd
lengths, forward and gradients against the dense oracle. New mechanisms are picked up from the
registry with no new test code."""

import zlib

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.kernels import block_size
from attnlab.testing import cases, compare_to_reference

ALL_CASES = [(m.name, c) for m in registry.MECHANISMS for c in cases(m)]


@pytest.mark.parametrize("blocks", [(8, 16), (16, 8), (8, 8)], ids=["bq8-bk16", "bq16-bk8", "bq8-bk8"])
@pytest.mark.parametrize(("name", "case"), ALL_CASES, ids=[f"{n}-{c}" for n, c in ALL_CASES])
def test_fast_path_matches_oracle(name, case, blocks):
    q, k, v = case.inputs(seed=zlib.crc32(str(case).encode()) % 1000)
    try:
        with block_size(*blocks):
            problems = compare_to_reference(name, q, k, v, impl=case.impl, causal=case.causal, **case.options)
    except ValueError as e:
        # An explicit impl may decline a pattern, but only with its reason, and auto must serve it.
        assert "cannot run this call" in str(e)
        attnlab.attention(q, k, v, name, causal=case.causal, **case.options)
        return
    assert not problems, problems


# Selections: at test sizes they run on the executor's gathered path (kernels.gathered), so the
# planned per-slice path gets the same contract here.
PER_SLICE = ("block_topk", "dynamic_hierarchical")
PER_SLICE_CASES = [(n, c) for n, c in ALL_CASES if n in PER_SLICE and c.impl != "reference"]


@pytest.mark.parametrize(("name", "case"), PER_SLICE_CASES, ids=[f"{n}-{c}" for n, c in PER_SLICE_CASES])
def test_planned_path_matches_oracle_on_per_slice_layouts(name, case, monkeypatch):
    from attnlab.kernels import gathered

    monkeypatch.setattr(gathered, "_SMALL_SLICE_AREA", -1)
    q, k, v = case.inputs(seed=zlib.crc32(str(case).encode()) % 1000)
    with block_size(8, 8):
        problems = compare_to_reference(name, q, k, v, impl=case.impl, causal=case.causal, **case.options)
    assert not problems, problems


@pytest.mark.parametrize("name", attnlab.mechanisms())
def test_auto_runs_every_supported_pattern_at_default_blocks(name):
    mech = attnlab.get(name)
    for T, S in ((70, 70), (33, 70)):
        for causal in (False, True):
            if registry.pattern(T, S, causal) not in mech.patterns:
                continue
            q = torch.randn(1, 4, T, 8, dtype=torch.float64)
            k, v = torch.randn(2, 1, 2, S, 8, dtype=torch.float64)
            assert not compare_to_reference(name, q, k, v, causal=causal, **mech.example(S))


def test_comparison_catches_a_wrong_fast_path(monkeypatch):
    """The check itself can fail: a fast path with a wrong scale must be reported."""
    from attnlab.mechanisms import sliding_window

    real = sliding_window.attention

    def wrong(q, k, v, *, causal=False, scale=None, window=512):
        return real(q, k, v, causal=causal, scale=0.5, window=window)

    mech = attnlab.get("sliding_window")
    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(wrong))
    q, k, v = torch.randn(3, 1, 2, 20, 8, dtype=torch.float64)
    assert compare_to_reference("sliding_window", q, k, v, causal=True, window=4)

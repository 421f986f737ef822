"""The contract, over every registered mechanism x impl x dtype x CAB pattern x MHA/GQA x odd
lengths, forward and gradients against the dense oracle. New mechanisms are picked up from the
registry with no new test code. Every test runs on the CPU, and on CUDA too when a GPU is present
(test ids start with the device, so ``-k cuda`` selects the CUDA half)."""

import zlib

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.kernels import block_size
from attnlab.testing import DEVICE_DTYPES, cases, compare_to_reference, devices

ALL_CASES = [(m.name, c) for m in registry.MECHANISMS for c in cases(m)]
BLOCKS = {"bq8-bk16": (8, 16), "bq16-bk8": (16, 8), "bq8-bk8": (8, 8)}
# On CUDA the tile sizes only shape the layout FlexAttention is handed: one setting covers that path
# (the CPU executor's run planning is what the three settings exercise).
DEVICE_BLOCKS = [(d, b) for d in devices() for b in (BLOCKS if d == "cpu" else ["bq8-bk16"])]


def _device_cases(cases_: list, device: str) -> list:
    return [(n, c) for n, c in cases_ if c.dtype in DEVICE_DTYPES[device] and device in devices(n)]


CONTRACT = [(d, b, n, c) for d, b in DEVICE_BLOCKS for n, c in _device_cases(ALL_CASES, d)]


@pytest.mark.parametrize(
    ("device", "blocks", "name", "case"), CONTRACT, ids=[f"{d}-{b}-{n}-{c}" for d, b, n, c in CONTRACT]
)
def test_fast_path_matches_oracle(device, blocks, name, case):
    blocks = BLOCKS[blocks]
    q, k, v = case.inputs(seed=zlib.crc32(str(case).encode()) % 1000, device=device)
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


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", attnlab.names())
def test_auto_runs_every_supported_pattern_at_default_blocks(name, device):
    mech = attnlab.get(name)
    dtype = torch.float64 if torch.float64 in DEVICE_DTYPES[device] else torch.float32
    for T, S in ((70, 70), (33, 70)):
        for causal in (False, True):
            if registry.pattern(T, S, causal) not in mech.patterns:
                continue
            q = torch.randn(1, 4, T, 8, dtype=torch.float64).to(device, dtype)
            k, v = torch.randn(2, 1, 2, S, 8, dtype=torch.float64).to(device, dtype)
            assert not compare_to_reference(name, q, k, v, causal=causal, **mech.example(S))


def test_comparison_catches_a_wrong_fast_path(monkeypatch):
    """The check itself can fail: a fast path with a wrong scale must be reported."""
    mech = attnlab.get("sliding_window")
    real = mech.impls["blocksparse"].fn

    def wrong(q, k, v, *, causal, scale=None, window):
        return real(q, k, v, causal=causal, scale=0.5, window=window)

    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(wrong))
    q, k, v = torch.randn(3, 1, 2, 20, 8, dtype=torch.float64)
    assert compare_to_reference("sliding_window", q, k, v, causal=True, window=4)


def test_comparison_catches_a_wrong_lse(monkeypatch):
    """The LSE is checked too: a fast path whose output is right but whose LSE is off must be reported."""
    from attnlab.core import AttentionOutput

    mech = attnlab.get("sliding_window")
    real = mech.impls["blocksparse"].fn

    def shifted(q, k, v, *, causal=False, scale=None, window=512):
        out, lse = real(q, k, v, causal=causal, scale=scale, window=window)
        return AttentionOutput(out, lse + 1e-6)

    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(shifted))
    q, k, v = torch.randn(3, 1, 2, 20, 8, dtype=torch.float64)
    problems = compare_to_reference("sliding_window", q, k, v, causal=True, window=4)
    assert len(problems) == 1 and problems[0].startswith("lse: max abs error")

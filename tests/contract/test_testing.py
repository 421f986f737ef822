"""attnlab.testing's device awareness: the contract's inputs, tolerances and device list."""

import torch

from attnlab import registry
from attnlab.testing import DEVICE_DTYPES, TOLERANCES, Case, cases, devices, run_contract, tolerances


def test_case_inputs_are_the_same_numbers_on_the_asked_device():
    case = next(cases(registry.get("sliding_window"), dtypes=(torch.bfloat16,)))
    on_cpu = case.inputs(seed=3)
    on_meta = case.inputs(seed=3, device="meta")  # any device: meta has shapes and dtypes, no values
    for a, b in zip(on_cpu, on_meta):
        assert b.device.type == "meta" and a.device.type == "cpu"
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
    # drawn on the CPU in fp64 then cast: the device never changes the numbers a case means
    again = Case(case.impl, torch.float64, case.causal, case.T, case.S, case.H, case.Hkv, case.options).inputs(seed=3)
    assert torch.equal(on_cpu[0], again[0].to(torch.bfloat16))


def test_tolerances_per_dtype_and_device():
    assert tolerances(torch.float64) == TOLERANCES[torch.float64]
    assert tolerances(torch.bfloat16, "cuda") == TOLERANCES[torch.bfloat16]
    (o_cpu, g_cpu), (o_cuda, g_cuda) = tolerances(torch.float32), tolerances(torch.float32, "cuda")
    assert o_cpu < o_cuda and g_cpu < g_cuda  # CUDA fp32: other summation orders, a few ulps more
    assert o_cuda[0] < TOLERANCES[torch.bfloat16][0][0]  # still far tighter than bf16's
    assert torch.float64 not in DEVICE_DTYPES["cuda"] and torch.float64 in DEVICE_DTYPES["cpu"]


def test_devices_lists_cuda_only_when_present():
    assert devices() == ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_run_contract_turns_any_exception_into_failures_and_counts_cases(monkeypatch):
    mech = registry.get("halo")

    def crash(q, k, v, **kw):
        raise IndexError("indices should be either on cpu or on the same device")

    monkeypatch.setitem(mech.impls, "blocksparse", registry.Impl(crash))
    report = run_contract("halo", dtypes=(torch.float32,))
    assert report.cases == 4 and report.failed_cases() == 4 and report.failed_cases(torch.float64) == 0
    assert all(
        p == "raised IndexError: indices should be either on cpu or on the same device" for _, p in report.failures
    )
    unknown = run_contract("no_such_mechanism")  # a broken record fails as a whole, never raises
    assert not unknown.passed and unknown.cases == 0 and "ValueError" in unknown.lines()[0]

"""The LSE contract: a record's ``has_lse`` is what its impls and its oracle return, ``attention_lse``
refuses every mechanism without one (with the record's reason, before computing anything), and a
record that declares an LSE it does not return fails the contract."""

import dataclasses
import re

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.testing import DEVICE_DTYPES, cases, compare_to_reference, devices, run_contract

WITH_LSE = [m.name for m in registry.MECHANISMS if m.has_lse]
WITHOUT_LSE = [m.name for m in registry.MECHANISMS if not m.has_lse]


def small_cases(mech, device):
    """One MHA-GQA case per impl x supported pattern, in the device's most exact dtype."""
    dtype = torch.float64 if torch.float64 in DEVICE_DTYPES[device] else torch.float32
    seen = set()
    for case in cases(mech, (dtype,)):
        key = (case.impl, case.causal, case.T == case.S)
        if case.H != case.Hkv and key not in seen:
            seen.add(key)
            yield case


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", attnlab.names())
def test_has_lse_is_what_every_impl_and_the_oracle_return(name, device):
    """Called directly (not through attention_lse, which would refuse or guard), each impl that
    accepts need_lse returns a [B, H, T] LSE in the compute dtype exactly when the record says
    has_lse, and so does the oracle (``impl="reference"`` and ``Mechanism.reference``)."""
    mech = attnlab.get(name)
    checked = 0
    for case in small_cases(mech, device):
        q, k, v = case.inputs(device=device)
        opts = mech.resolve(case.T, case.S, case.causal, case.options)
        impl = mech.impls[case.impl]
        want = (q.shape[0], q.shape[1], q.shape[2])
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        results = {"reference": mech.reference(q, k, v, causal=case.causal, **case.options).lse}
        if impl.reason(q, k, v, case.causal, True, opts) is None:
            results[case.impl] = impl.fn(q, k, v, causal=case.causal, scale=None, **opts).lse
        elif mech.has_lse:
            continue  # refused need_lse: auto takes another impl (test below)
        for who, lse in results.items():
            if mech.has_lse:
                assert lse is not None, f"{name} declares has_lse but {who} ({case}) returned None"
                assert (tuple(lse.shape), lse.dtype) == (want, lse_dtype), f"{who} ({case})"
            else:
                assert lse is None, f"{name} declares no LSE ({mech.no_lse}) but {who} ({case}) returned one"
        checked += 1
    assert checked, f"no case of {name} was checked"


@pytest.mark.parametrize("name", WITHOUT_LSE)
def test_attention_lse_refuses_mechanisms_without_one(name, monkeypatch):
    mech = attnlab.get(name)
    reason = f"{name} has no log-sum-exp.*{re.escape(mech.no_lse)}"
    # before any compute: not even the inputs are looked at
    for impl in ("auto", "reference", *mech.impls):
        with pytest.raises(ValueError, match=reason):
            attnlab.attention_lse(None, None, None, name, impl=impl)
    # and on valid inputs, no impl is called
    for impl_name in mech.impls:
        monkeypatch.setitem(mech.impls, impl_name, registry.Impl(lambda *a, **kw: pytest.fail("impl ran")))
    case = next(cases(mech, (torch.float64,)))
    q, k, v = case.inputs()
    with pytest.raises(ValueError, match=reason):
        attnlab.attention_lse(q, k, v, name, causal=case.causal, **case.options)
    assert attnlab.attention(q, k, v, name, causal=case.causal, impl="reference", **case.options).shape == q.shape


def test_every_reason_is_one_line_and_only_records_without_lse_have_one():
    assert WITH_LSE and WITHOUT_LSE
    for m in registry.MECHANISMS:
        assert (m.no_lse is None) == m.has_lse and "\n" not in (m.no_lse or "")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"has_lse": False}, "needs a one-line no_lse reason"),
        ({"no_lse": "a reason"}, "needs a one-line no_lse reason"),
        ({"has_lse": False, "no_lse": " "}, "needs a one-line no_lse reason"),
        ({"has_lse": False, "no_lse": "two\nlines"}, "needs a one-line no_lse reason"),
    ],
)
def test_record_refuses_inconsistent_lse_fields(change, match):
    with pytest.raises(TypeError, match=match):
        dataclasses.replace(attnlab.get("dense"), **change)


def _claiming_lse(name: str, monkeypatch):
    """The registry with ``name``'s record flipped to has_lse=True (its code unchanged)."""
    fake = dataclasses.replace(attnlab.get(name), has_lse=True, no_lse=None)
    monkeypatch.setitem(registry._BY_NAME, name, fake)
    return fake


@pytest.mark.parametrize("name", WITHOUT_LSE)
def test_a_record_claiming_an_lse_it_does_not_return_fails_the_contract(name, monkeypatch):
    """What would have caught the old records: a has_lse=True mechanism whose paths return None."""
    fake = _claiming_lse(name, monkeypatch)
    case = next(cases(fake, (torch.float64,)))
    q, k, v = case.inputs()
    with pytest.raises(RuntimeError, match=f"{name} .*returned no LSE"):
        compare_to_reference(name, q, k, v, causal=case.causal, **case.options)
    report = run_contract(name, (torch.float64,))
    assert report.cases and not report.passed
    assert all("returned no LSE" in line for line in report.lines())


def test_an_impl_refusing_need_lse_hands_the_call_to_one_that_gives_it():
    """Public SDPA has no LSE off the CPU: with need_lse its impls refuse and auto takes the
    executor; without it SDPA still runs. (A meta tensor stands in for a non-CPU device.)"""
    q, k, v = (torch.empty(1, 4, 9, 8, device="meta") for _ in range(3))
    picked = {}
    for name in ("dense", "moh", "dha"):
        mech = attnlab.get(name)
        opts = mech.resolve(9, 9, False, {})
        picked[name] = (
            registry._pick_impl(mech, q, k, v, False, "auto", opts, need_lse=True),
            registry._pick_impl(mech, q, k, v, False, "auto", opts, need_lse=False),
        )
        first = next(iter(mech.impls))
        with pytest.raises(ValueError, match="no log-sum-exp off CPU"):
            registry._pick_impl(mech, q, k, v, False, first, opts, need_lse=True)
    assert picked == {
        "dense": ("blocksparse", "sdpa"),
        "moh": ("blocksparse", "sdpa"),
        "dha": ("blocksparse", "grouped_sdpa"),
    }


@pytest.mark.parametrize("name", WITH_LSE)
def test_attention_lse_agrees_with_attention(name):
    """attention_lse's output is attention's, and its LSE the oracle's, at the record's example."""
    mech = attnlab.get(name)
    case = next(cases(mech, (torch.float64,)))
    q, k, v = case.inputs(seed=3)
    got = attnlab.attention_lse(q, k, v, name, causal=case.causal, **case.options)
    ref = attnlab.attention_lse(q, k, v, name, causal=case.causal, impl="reference", **case.options)
    torch.testing.assert_close(got.out, attnlab.attention(q, k, v, name, causal=case.causal, **case.options))
    empty = torch.isneginf(ref.lse)
    assert torch.equal(torch.isneginf(got.lse), empty)
    torch.testing.assert_close(got.lse[~empty], ref.lse[~empty], atol=1e-10, rtol=1e-10)

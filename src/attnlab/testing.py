"""Tolerances and the comparison against the dense oracle, shared by the test suite and
``attnlab check`` so both hold every fast path to the same bar, on the CPU and on CUDA.

The contract's inputs are drawn on the CPU in fp64 and then moved, so a case is the same numbers on
every device; the oracle runs on the same device as the fast path (in >= fp32).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab import registry
from attnlab.core import AttentionOutput

# (atol, rtol) for outputs and for gradients. fp64 checks exactness; fp32 and bf16 check that the
# fast path is as accurate as the dtype allows against an oracle that computes in >= fp32.
TOLERANCES = {
    torch.float64: ((1e-10, 1e-10), (1e-9, 1e-9)),
    torch.float32: ((2e-5, 2e-5), (1e-4, 1e-4)),
    torch.bfloat16: ((2e-2, 2e-2), (6e-2, 6e-2)),
    torch.float16: ((4e-3, 4e-3), (1e-2, 1e-2)),
}
# On CUDA, fp32 sums run in another order (tiled Triton kernels, atomics in Flex's dq) than the
# oracle's cuBLAS matmuls: a few ulps more than on the CPU, still far below any masking error.
CUDA_FP32 = ((5e-5, 5e-5), (2e-4, 2e-4))

# The dtypes the contract covers per device type: fp64 (exactness) where the fast path supports it.
DEVICE_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.bfloat16),
}


def tolerances(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """((atol, rtol) for outputs, (atol, rtol) for gradients) for ``dtype`` on ``device``."""
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        return CUDA_FP32
    return TOLERANCES[dtype]


def devices(name: str | None = None) -> list[str]:
    """The device types the test suite runs the contract on: the CPU, and CUDA when present (for a
    mechanism: those its record serves)."""
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return found if name is None else [d for d in found if d in registry.get(name).devices]


def _close(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    g, w = got.double(), want.double()
    err = (g - w).abs() - (atol + rtol * w.abs())
    if (err > 0).any():
        return f"{name}: max abs error {(g - w).abs().max().item():.3g} exceeds atol={atol} rtol={rtol}"
    return None


def compare_to_reference(
    mechanism: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    impl: str = "auto",
    causal=False,
    scale=None,
    grad: bool = True,
    **options,
) -> list[str]:
    """Run ``impl`` and the oracle on the same inputs; return the list of mismatches (empty = pass).

    Compares the output, the LSE (for every mechanism whose record has ``has_lse``) and, when
    ``grad``, dq, dk, dv for a random upstream gradient, with the tolerances of q's dtype on q's
    device. Rows with no allowed key must give exactly 0 and finite gradients. A mechanism that
    declares an LSE but returns None fails (``attention_lse`` raises RuntimeError for it).
    """
    (o_tol, g_tol) = tolerances(q.dtype, q.device)
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    has_lse = registry.get(mechanism).has_lse
    got = attention_output(*leaves, mechanism, causal=causal, scale=scale, impl=impl, **options)
    want = attention_output(*ref_leaves, mechanism, causal=causal, scale=scale, impl="reference", **options)
    problems = [p for p in [_close("out", got.out, want.out, *o_tol)] if p]
    if got.out.dtype != q.dtype:
        problems.append(f"out dtype {got.out.dtype} != q dtype {q.dtype}")
    if has_lse:
        empty = torch.isneginf(want.lse)
        if got.lse.shape != want.lse.shape or got.lse.dtype != want.lse.dtype:
            problems.append(f"lse {tuple(got.lse.shape)} {got.lse.dtype} != {tuple(want.lse.shape)} {want.lse.dtype}")
        elif not torch.equal(torch.isneginf(got.lse), empty):
            problems.append("lse is -inf on a different set of rows than the oracle")
        elif (p := _close("lse", got.lse[~empty], want.lse[~empty], *o_tol)) is not None:
            problems.append(p)
    else:  # no LSE marks the rows without keys, so no row is checked for being exactly 0
        empty = torch.zeros(want.out.shape[:3], dtype=torch.bool, device=want.out.device)
    if bool(empty.any()) and bool(got.out[empty].abs().max() != 0):
        problems.append("rows with no allowed key are not exactly 0")
    if grad:
        upstream = torch.randn_like(want.out, dtype=torch.float32).to(q.dtype)
        g_got = torch.autograd.grad(got.out, leaves, upstream, allow_unused=True)
        g_want = torch.autograd.grad(want.out, ref_leaves, upstream, allow_unused=True)
        for name, a, b, x in zip(("dq", "dk", "dv"), g_got, g_want, leaves):
            # None = the output does not depend on that input (input-independent patterns): zeros
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            if (p := _close(name, a, b, *g_tol)) is not None:
                problems.append(p)
    return problems


def attention_output(q: Tensor, k: Tensor, v: Tensor, mechanism: str, **kwargs) -> AttentionOutput:
    """``attention_lse`` for a mechanism with an LSE, ``(attention(...), None)`` for one without
    (``attention_lse`` refuses those): one call for tests that loop over the registry."""
    if registry.get(mechanism).has_lse:
        return registry.attention_lse(q, k, v, mechanism, **kwargs)
    return AttentionOutput(registry.attention(q, k, v, mechanism, **kwargs), None)


@dataclass(frozen=True)
class Case:
    """One contract configuration."""

    impl: str
    dtype: torch.dtype
    causal: bool
    T: int
    S: int
    H: int
    Hkv: int
    options: dict

    def inputs(self, seed: int = 0, B: int = 2, D: int = 16, Dv: int = 16, device: torch.device | str = "cpu"):
        """q, k, v on ``device``: drawn on the CPU in fp64, so every device sees the same numbers."""
        g = torch.Generator().manual_seed(seed)
        shapes = ((B, self.H, self.T, D), (B, self.Hkv, self.S, D), (B, self.Hkv, self.S, Dv))
        return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device, self.dtype) for s in shapes)

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        causal = "causal" if self.causal else "full"
        return f"{self.impl}-{dt}-{causal}-T{self.T}-S{self.S}-H{self.H}kv{self.Hkv}"


LENGTHS = {"self": [(37, 37), (64, 64)], "cross": [(13, 37), (40, 23)]}


def cases(mech: registry.Mechanism, dtypes=(torch.float32, torch.bfloat16, torch.float64)) -> Iterator[Case]:
    """Every impl x dtype x CAB pattern x {MHA, GQA} x odd lengths the mechanism supports."""
    for impl in mech.impls:
        for dtype in dtypes:
            for causal in (False, True):
                for kind in ("self", "cross"):
                    for T, S in LENGTHS[kind]:
                        if registry.pattern(T, S, causal) not in mech.patterns:
                            continue
                        for H, Hkv in ((2, 2), (4, 2)):
                            yield Case(impl, dtype, causal, T, S, H, Hkv, mech.example(S))


@dataclass
class MechanismCheck:
    """The contract's outcome for one mechanism on one device: every case run, and what failed."""

    name: str
    device: str
    cases: int = 0
    failures: list[tuple[Case | None, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def failed_cases(self, dtype: torch.dtype | None = None) -> int:
        """Distinct failing cases (of ``dtype`` when given)."""
        return len({str(c) for c, _ in self.failures if dtype is None or (c is not None and c.dtype == dtype)})

    def lines(self) -> list[str]:
        return [f"{case}: {problem}" if case is not None else problem for case, problem in self.failures]


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def run_contract(name: str, dtypes=(torch.float32, torch.float64), device: torch.device | str = "cpu"):
    """The contract on tiny shapes for one mechanism on ``device``. Never raises for the
    mechanism's sake: an exception in a case is that case's failure, and the other cases still run."""
    from attnlab.kernels import block_size

    device = torch.device(device)
    report = MechanismCheck(name, str(device))
    t0 = time.perf_counter()
    try:
        mech = registry.get(name)
        all_cases = list(cases(mech, dtypes))
    except Exception as e:  # a record that cannot even list its cases fails as a whole
        report.failures.append((None, f"raised {_one_line(e)}"))
        return report
    with block_size(8, 16):  # small tiles so tiny inputs still span many blocks
        for case in all_cases:
            report.cases += 1
            try:
                q, k, v = case.inputs(device=device)
                problems = compare_to_reference(name, q, k, v, impl=case.impl, causal=case.causal, **case.options)
            except ValueError as e:
                if case.impl != "auto" and "cannot run this call" in str(e):
                    continue  # an explicit impl declining a pattern it does not serve is the contract
                problems = [f"raised {_one_line(e)}"]
            except Exception as e:  # a crash is one failure among the report's, not the end of the run
                problems = [f"raised {_one_line(e)}"]
            report.failures += [(case, p) for p in problems]
    report.seconds = time.perf_counter() - t0
    return report


def check_mechanism(name: str, dtypes=(torch.float32, torch.float64), device: torch.device | str = "cpu") -> list[str]:
    """The contract on tiny shapes for one mechanism: a list of failures, empty when it passes."""
    return run_contract(name, dtypes, device).lines()


def tile_classes(mask: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """Brute-force block classification of a bool [T, S] mask: (visited, full) [nQB, nKB], where
    full means every real row allows every real key of the tile. For checking layout builders."""
    T, S = mask.shape
    pad = torch.nn.functional.pad(mask, (0, -S % block_k, 0, -T % block_q))
    real_rows = torch.nn.functional.pad(torch.ones(T, dtype=torch.bool), (0, -T % block_q))
    real_keys = torch.nn.functional.pad(torch.ones(S, dtype=torch.bool), (0, -S % block_k))
    tiles = pad.view(-1, block_q, pad.shape[1] // block_k, block_k)
    ignore = ~real_rows.view(-1, block_q, 1, 1) | ~real_keys.view(1, 1, -1, block_k)
    return tiles.any(3).any(1), (tiles | ignore).all(3).all(1)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces inside the block (for the no-T*S check)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out

"""The baselines an efficiency row is timed against besides raw SDPA, on the same inputs:

* compiled FlexAttention (Dong et al., arXiv 2412.05496) under the row's own mask predicate, with the
  BlockMask built (``kernels.flex.block_mask``) and the kernel compiled before the timing starts;
  forward and backward on CUDA, forward only on the CPU (where torch.compile serves Flex for inference);
* flash-linear-attention's chunk kernels (Yang et al., fla-core) beside ``linear``
  (``chunk_linear_attn`` on the feature-mapped q, k, normalized) and ``lightning``
  (``chunk_simple_gla`` with the per-head log decay), causal only, on CUDA when ``import fla`` works.

Each baseline reports its first call (BlockMask + compile / Triton autotuning + the call) apart from
the steady-state step the benchmark times. A baseline that cannot run raises
:class:`BaselineUnavailable` with the reason, which the benchmark puts in the row's note.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab import registry
from attnlab.bench.measure import elapsed
from attnlab.spec import Mechanism


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run for this row (device, mode, a missing library); the message says why."""


@dataclass
class Baseline:
    step: Callable[[], object]  # one timed call (forward, or forward + backward)
    first_s: float  # everything before the first result: mask, compile, the first call itself
    note: str = ""  # something the reader must know about the comparison


def one_line(e: BaseException) -> str:
    """An exception as one short line for a table or a note."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _step(fn: Callable[[], Tensor], grad_of: tuple[Tensor, ...] | None) -> Callable[[], None]:
    """``fn`` as a timed call: forward only under no_grad, or forward + backward through ``grad_of``."""
    if grad_of is None:

        def forward():
            with torch.no_grad():
                fn()

        return forward

    def step():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in grad_of:
            t.grad = None

    return step


# -- FlexAttention ---------------------------------------------------------------------------------


@functools.cache
def _compiled_flex():
    # The baseline's own compiled function: independent of whatever the executor does with Flex.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_baseline(layout, q: Tensor, k: Tensor, v: Tensor, mode: str) -> Baseline:
    """Compiled Flex under ``layout``'s predicate (q [B,H,T,D], k/v [B,Hkv,S,D]); raises
    :class:`BaselineUnavailable` with the reason when it cannot run."""
    if mode != "fwd" and q.device.type != "cuda":
        raise BaselineUnavailable("flex: forward only on the CPU (torch.compile serves Flex for inference there)")
    try:
        from attnlab.kernels.flex import block_mask

        holder = {}

        def first():
            holder["mask"] = block_mask(layout, q.shape[0], q.shape[1], q.device)
            return _compiled_flex()(
                q, k, v, block_mask=holder["mask"], scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[1] != k.shape[1]
            )

        grad_of = (q, k, v) if mode != "fwd" else None
        first_s = elapsed(_step(first, grad_of), q.device)
        mask = holder["mask"]

        def call():
            return _compiled_flex()(
                q, k, v, block_mask=mask, scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[1] != k.shape[1]
            )

        return Baseline(_step(call, grad_of), first_s)
    except Exception as e:  # torch.compile needs a C++ toolchain on CPU; Flex's CPU mask builder T*S memory
        raise BaselineUnavailable(f"flex unavailable: {one_line(e)}") from e


# -- flash-linear-attention ------------------------------------------------------------------------


def has_fla_bridge(mech: Mechanism) -> bool:
    """Whether fla's kernel is timed beside the mechanism: a record with an ``fla`` impl (linear
    attention and its decayed form) has an fla chunk kernel computing the same thing."""
    return "fla" in mech.impls


def fla_status(device: torch.device | str) -> str | None:
    """None when fla's kernels can run on ``device``, else the reason (said once per run)."""
    if torch.device(device).type != "cuda":
        return "fla baseline: skipped, its kernels are Triton (CUDA only)"
    try:
        import fla  # noqa: F401
        from fla.ops.linear_attn import chunk_linear_attn  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception as e:  # not installed, or installed without a working Triton
        return f"fla baseline: skipped, fla is not importable ({one_line(e)}); pip install fla-core"
    return None


def _keywords(fn, **wanted) -> dict:
    """Only the keywords ``fn`` takes: fla renamed and dropped some across releases (head_first)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in wanted.items() if k in params}


def _fla_call(name: str, opts: dict, q: Tensor, k: Tensor, v: Tensor) -> Callable[[], Tensor]:
    """fla's forward for ``name`` on our [B,H,T,D] tensors; returns [B,H,T,Dv]."""
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    from attnlab.mechanisms import lightning, linear

    H, scale = q.shape[1], q.shape[-1] ** -0.5
    groups = H // k.shape[1]

    def bthd(t: Tensor, expand: int = 1) -> Tensor:  # fla's layout is [B, T, H, D]; kv heads expanded
        return t.repeat_interleave(expand, dim=1).transpose(1, 2)

    if "decay" not in registry.get(name).defaults:  # undecayed: fla's linear_attn on phi(q), phi(k)
        phi = linear.FEATURE_MAPS[opts.get("feature_map", "elu+1")]
        normalize = linear.NORMALIZED[opts.get("feature_map", "elu+1")]
        kw = _keywords(chunk_linear_attn, scale=scale, normalize=normalize, head_first=False)
        return lambda: chunk_linear_attn(bthd(phi(q)), bthd(phi(k), groups), bthd(v, groups), **kw)[0].transpose(1, 2)
    log_gamma = torch.log(lightning.decay_tensor(opts.get("decay"), H, q.device).float())  # [H]
    if "g_gamma" in inspect.signature(chunk_simple_gla).parameters:
        kw = _keywords(chunk_simple_gla, g_gamma=log_gamma, scale=scale, head_first=False)
        return lambda: chunk_simple_gla(bthd(q), bthd(k, groups), bthd(v, groups), **kw)[0].transpose(1, 2)
    B, T = q.shape[0], q.shape[2]  # older fla: a per-token log decay [B, T, H] instead
    g = log_gamma.view(1, 1, H).expand(B, T, H).contiguous()
    kw = _keywords(chunk_simple_gla, g=g, scale=scale, head_first=False)
    return lambda: chunk_simple_gla(bthd(q), bthd(k, groups), bthd(v, groups), **kw)[0].transpose(1, 2)


def fla_baseline(name: str, opts: dict, causal: bool, q: Tensor, k: Tensor, v: Tensor, mode: str, ours) -> Baseline:
    """fla's chunk kernel for ``name`` (causal self-attention) as a :class:`Baseline`; raises
    :class:`BaselineUnavailable` with the reason when it cannot run. ``ours`` is our forward
    (q, k, v) -> out: the two outputs are compared once, so a mismatch of conventions shows in the
    row's note instead of passing as a speedup."""
    if not causal or q.shape[2] != k.shape[2]:
        raise BaselineUnavailable("fla: causal self-attention only")
    try:
        fn = _fla_call(name, opts, q, k, v)
        grad_of = (q, k, v) if mode != "fwd" else None
        first_s = elapsed(_step(fn, grad_of), q.device)
        with torch.no_grad():
            got, want = fn().float(), ours(q, k, v).float()
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        note = f"fla output differs from ours (max error / max |ours| = {err:.2g}); timed anyway" if err > 5e-2 else ""
        return Baseline(_step(fn, grad_of), first_s, note)
    except Exception as e:
        raise BaselineUnavailable(f"fla failed: {one_line(e)}") from e

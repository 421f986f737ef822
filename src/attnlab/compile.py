"""torch.compile support: an attention call is one opaque custom operator in the compiled graph.

The executor plans each layout in Python: it reads tensor values (block lists, run lengths) and
makes shapes from them, so dynamo breaks the graph at every such read (39 times for one
``sliding_window`` call), ``fullgraph=True`` fails, and every new sequence length recompiles. The
linear family traces, but its chunking specializes on the length. So while compiling, a call goes
through ``attnlab::attention`` (``torch.library.custom_op``): dynamo sees one op whose fake gives
``out [B, H, T, Dv]`` from the input shapes, and at run time the op calls the ordinary eager path
with the real tensors, which looks up (or builds and caches) the layout for the real T and S. With
``dynamic=True`` a new length is a new symbolic size, not a recompile.

What travels through the op: q, k, v, the mechanism and impl names, the scale, and the call's
``causal`` and options as a :class:`Packed`: a JSON spec for their structure (strings, bools,
None, tuples, lists) pointing into a Tensor list (``document_ids``, region ``groups``/``rules``),
an int list (symbolic under ``dynamic=True``, so a new ``window`` does not recompile either) and
a float list. Option values are validated inside the op, by the same code as in eager mode, so a
bad value raises the same ValueError when the compiled function runs.

Backward: ``attnlab::attention_backward`` runs the forward again under autograd and calls
``torch.autograd.grad``: exact, since the same eager code computes both, at the cost of one extra
forward per backward. Keeping the forward's autograd graph for the backward would be state
outside the graph's tensors, which AOT's memory planning and CUDA graphs do not see. A backward
from saved tensors alone needs an entry ``backward(q, k, v, out, lse, dout, layout)``: the CPU
executor has one inside, but Flex (CUDA) and the linear family's autograd do not, so the recompute
is the boundary that serves every path without reaching into the kernels. Measured forward +
backward, B=1 H=8 T=2048 D=64 fp32 on 2 shared CPU cores, compiled (aot_eager) / eager, two
runs: sliding_window (window 256) 1.12-1.23, document (3 documents) 1.18-1.38, linear 1.36-1.38;
forward alone 0.88-1.05 (the op itself costs nothing measurable; the difference is the recompute).

Not routed through the op (``traced``): dense SDPA, which PyTorch compiles natively, the
``impl="reference"`` oracle, and the mechanisms whose fast path is plain traceable tensor code
(``Impl.traced`` on the mechanism's record). A call the op cannot carry runs eagerly behind exactly one graph break
(``torch._dynamo.disable``): a precomputed ``selection=`` object, an option value that is not
None/bool/int/float/str/tuple/list/Tensor, a tensor option that requires grad (the op would drop
its gradient), or a need_lse call on a record without ``has_lse`` (``attention_lse`` refuses those
before they get here).
"""

from __future__ import annotations

import contextlib
import json
from typing import NamedTuple

import torch
from torch import Tensor
from torch._C import DispatchKey, DispatchKeySet

from attnlab.core import AttentionOutput, check_qkv, compute_dtype, resolve_scale

# Strings go into the spec unescaped: names and values made of these characters only, else no op.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_.")


# -- the spec: causal and the options as JSON, traced by dynamo into a constant -------------------


class Packed(NamedTuple):
    """A call's ``causal`` and options for the op: the JSON ``spec`` holds the structure, strings,
    bools and None, and points by index into the other lists. Ints travel as ints, so an option
    dynamo made symbolic (``dynamic=True``) stays symbolic instead of recompiling per value."""

    spec: str
    tensors: list[Tensor]
    ints: list[int]
    floats: list[float]


def _encode(value, packed: Packed) -> str | None:
    """JSON for one value, or None when it can't travel. Written without ``json.dumps``, which
    dynamo can't trace."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    for kind, types, store in (
        ("int", int, packed.ints),
        ("float", float, packed.floats),
        ("tensor", Tensor, packed.tensors),
    ):
        if isinstance(value, types):
            store.append(value)
            return '{"' + kind + '": ' + str(len(store) - 1) + "}"
    if isinstance(value, str):
        return '"' + value + '"' if all(c in _SAFE for c in value) else None
    if isinstance(value, (tuple, list)):
        parts = [_encode(x, packed) for x in value]
        if any(p is None for p in parts):
            return None
        body = "[" + ", ".join(parts) + "]"
        return '{"tuple": ' + body + "}" if isinstance(value, tuple) else body
    return None


def encode(causal, options: dict) -> Packed | None:
    """The call's causal and options packed for the op, or None when some value can't travel."""
    packed = Packed("", [], [], [])
    parts = []
    for name, value in (("causal", causal), *options.items()):
        text = _encode(value, packed)
        if text is None or not all(c in _SAFE for c in name):
            return None
        parts.append('"' + name + '": ' + text)
    return packed._replace(spec="{" + ", ".join(parts) + "}")


def _decode_value(x, packed: Packed):
    if isinstance(x, list):
        return [_decode_value(y, packed) for y in x]
    if isinstance(x, dict):
        (kind, inner), *_ = x.items()
        if kind == "tuple":
            return tuple(_decode_value(y, packed) for y in inner)
        return {"int": packed.ints, "float": packed.floats, "tensor": packed.tensors}[kind][inner]
    return x


def decode(packed: Packed) -> tuple[object, dict]:
    """Inverse of :func:`encode`: (causal, options)."""
    options = {name: _decode_value(x, packed) for name, x in json.loads(packed.spec).items()}
    return options.pop("causal"), options


# -- the operators ---------------------------------------------------------------------------------
#
# Every operator takes the call as (q, k, v, tensors, ints, floats, mechanism, spec, scale, impl).


# The eager entry point (``registry._run``), bound by the registry as it loads: an op's kernel finds
# it by name at run time, and importing the registry here would tie the two modules in a circle.
_EAGER_RUN = None


def bind(run) -> None:
    """Set the eager call ``run(q, k, v, mechanism, causal, scale, impl, options, need_lse, selection)``."""
    global _EAGER_RUN
    _EAGER_RUN = run


def _eager(q, k, v, tensors, ints, floats, mechanism, spec, scale, impl, need_lse) -> AttentionOutput:
    """The ordinary eager call (validation, layout lookup, fast path) with the real tensors."""
    causal, options = decode(Packed(spec, tensors, ints, floats))
    return _EAGER_RUN(q, k, v, mechanism, causal, scale, impl, options, need_lse)


# A plain eager call's dispatch state: factory functions select their backend, views track
# versions, and every key above the backend is live except autocast (off in any custom op).
_INCLUDE = DispatchKeySet(DispatchKey.BackendSelect).add(DispatchKey.ADInplaceOrView)
_LIVE = [key for name, key in DispatchKey.__members__.items() if not name.startswith("Autocast")]


@contextlib.contextmanager
def _as_eager(grad: bool):
    """The dispatch state of a plain eager call, for the call inside an op's kernel.

    A kernel runs with the dispatch keys above it excluded: autograd always (no_grad alone would
    not bring it back for the backward's recompute), and under a dispatch mode (AOT autograd's
    runtime wrapper installs one) also vmap, which the layouts' mask predicates use."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _LIVE:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(_INCLUDE, exclude), torch.set_grad_enabled(grad):
        yield


def _owned(x: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """Contiguous (as the fake promises) and never an alias of an input (custom op rule)."""
    x = x.contiguous()
    if any(x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        x = x.clone()
    return x


@torch.library.custom_op("attnlab::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    ints: list[int],
    floats: list[float],
    mechanism: str,
    spec: str,
    scale: float | None,
    impl: str,
) -> Tensor:
    """out [B, H, T, Dv]."""
    with _as_eager(grad=False):
        out = _eager(q, k, v, tensors, ints, floats, mechanism, spec, scale, impl, False).out
    return _owned(out, (q, k, v, *tensors))


@torch.library.custom_op("attnlab::attention_lse", mutates_args=())
def _attention_lse_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    ints: list[int],
    floats: list[float],
    mechanism: str,
    spec: str,
    scale: float | None,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """out [B, H, T, Dv], lse [B, H, T] in the compute dtype (fp32, fp64 for fp64 inputs)."""
    with _as_eager(grad=False):
        out, lse = _eager(q, k, v, tensors, ints, floats, mechanism, spec, scale, impl, True)
    if lse is None:
        raise RuntimeError(f"{mechanism} returned no LSE inside attnlab::attention_lse")
    inputs = (q, k, v, *tensors)
    return _owned(out, inputs), _owned(lse.to(compute_dtype(q.dtype)), inputs)


@torch.library.custom_op("attnlab::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    ints: list[int],
    floats: list[float],
    mechanism: str,
    spec: str,
    scale: float | None,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: the forward again under autograd, then its vector-Jacobian product."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with _as_eager(grad=True):
        out = _eager(*leaves, tensors, ints, floats, mechanism, spec, scale, impl, False).out
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return tuple(
        torch.zeros_like(x, memory_format=torch.contiguous_format) if g is None else g.contiguous()
        for x, g in zip(leaves, grads)
    )


def _out_shape(q: Tensor, v: Tensor) -> tuple:
    return (*q.shape[:3], v.shape[3])  # [B, H, T, Dv]


@_attention_op.register_fake
def _(q, k, v, *call):
    return q.new_empty(_out_shape(q, v))


@_attention_lse_op.register_fake
def _(q, k, v, *call):
    return q.new_empty(_out_shape(q, v)), q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))


@_attention_backward_op.register_fake
def _(dout, q, k, v, *call):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, *ctx.call = inputs  # call: ints, floats, mechanism, spec, scale, impl
    ctx.n_tensors = len(tensors)
    ctx.save_for_backward(q, k, v, *tensors)


def _backward(ctx, dout, _dlse=None):
    """The LSE carries no gradient, as in eager mode (the executor marks it non-differentiable)."""
    q, k, v, *tensors = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout, q, k, v, tensors, *ctx.call)
    # No gradient for the rest; an empty list argument needs an empty list (torch.library's rule).
    rest = [[] if isinstance(x, list) and not x else None for x in ctx.call]
    return dq, dk, dv, [None] * ctx.n_tensors, *rest


_attention_op.register_autograd(_backward, setup_context=_setup_context)
_attention_lse_op.register_autograd(_backward, setup_context=_setup_context)


# -- dispatch while compiling ----------------------------------------------------------------------


def run(q, k, v, mech, causal, scale, impl: str, options: dict, need_lse: bool, selection=None) -> AttentionOutput:
    """``registry._run`` while dynamo traces: one custom op, or one graph break when the call can't
    travel through it (see the module docstring)."""
    # A selection is an object holding a layout and its predicate (a Python closure): the op's
    # schema carries tensors and scalars only, so a call given one runs eagerly.
    if selection is not None:
        return _eager_break(q, k, v, mech.name, causal, scale, impl, options, need_lse, selection)
    packed = encode(causal, options)
    if packed is None or (need_lse and not mech.has_lse) or any(t.requires_grad for t in packed.tensors):
        return _eager_break(q, k, v, mech.name, causal, scale, impl, options, need_lse)
    check_qkv(q, k, v)  # shape errors raise while tracing; option errors raise inside the op
    scale = None if scale is None else resolve_scale(scale, q.shape[-1])
    call = (packed.tensors, packed.ints, packed.floats, mech.name, packed.spec, scale, impl)
    if need_lse:
        return AttentionOutput(*_attention_lse_op(q, k, v, *call))
    return AttentionOutput(_attention_op(q, k, v, *call), None)


@torch._dynamo.disable
def _eager_break(q, k, v, mechanism, causal, scale, impl, options, need_lse, selection=None) -> AttentionOutput:
    return _EAGER_RUN(q, k, v, mechanism, causal, scale, impl, options, need_lse, selection)

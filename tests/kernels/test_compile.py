"""torch.compile: no graph break for the static-mask mechanisms, the selections and the linear
family (counted with torch._dynamo.explain), fullgraph forward+backward equal to the dense oracle,
no recompile for a new length under dynamic=True, and errors and eager behaviour unchanged.

Tiny shapes and the aot_eager backend (it runs the forward and backward graphs AOT autograd builds,
without codegen) keep this file fast; one test goes through the default inductor backend."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab import compile as attn_compile
from attnlab import registry
from attnlab.kernels import block_size
from attnlab.nn import Attention
from attnlab.testing import TOLERANCES

OPAQUE = [m.name for m in registry.MECHANISMS if m.layout is not None and m.name != "dense"] + ["linear", "lightning"]
SELECTIONS = ["block_topk", "dynamic_hierarchical", "span_search"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with block_size(8, 8):  # small tiles: tiny inputs still span many blocks
        yield
    torch._dynamo.reset()


def causal_for(mech: registry.Mechanism) -> bool:
    return "self_causal" in mech.patterns


def inputs(T: int, *, B: int = 2, H: int = 4, Hkv: int = 2, D: int = 8, grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D))
    return [torch.randn(s, generator=g).requires_grad_(grad) for s in shapes]


def assert_matches_reference(fn, name, causal, opts, T=36):
    """fn (compiled) against the oracle: output and dq, dk, dv, fp32 tolerances."""
    (o_tol, g_tol) = TOLERANCES[torch.float32]
    leaves, ref_leaves = inputs(T, grad=True), inputs(T, grad=True)
    got = fn(*leaves)
    want = attnlab.attention(*ref_leaves, name, causal=causal, impl="reference", **opts)
    torch.testing.assert_close(got, want, atol=o_tol[0], rtol=o_tol[1])
    upstream = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, ref_leaves, upstream)):
        torch.testing.assert_close(a, b, atol=g_tol[0], rtol=g_tol[1])


def graph_breaks(fn, *args) -> int:
    """The breaks explain reports (its graph_break_count is graphs - 1, which misses a break
    before which no op was traced)."""
    torch._dynamo.reset()
    return len(torch._dynamo.explain(fn)(*args).break_reasons)


@pytest.mark.parametrize("name", OPAQUE + SELECTIONS)
def test_no_graph_break_and_fullgraph_equals_oracle(name):
    mech = registry.get(name)
    causal, opts = causal_for(mech), mech.example(36)

    def fn(q, k, v):
        return attnlab.attention(q, k, v, name, causal=causal, **opts)

    assert graph_breaks(fn, *inputs(36)) == 0
    assert_matches_reference(torch.compile(fn, backend="aot_eager", fullgraph=True), name, causal, opts)


def test_dense_stays_on_sdpa_in_the_graph():
    """Dense SDPA is traced (no opaque op): the compiler sees and can fuse it."""
    gm = []
    torch.compile(lambda q, k, v: attnlab.attention(q, k, v, causal=True), backend=lambda g, _: gm.append(g) or g)(
        *inputs(16)
    )
    targets = {str(n.target) for n in gm[0].graph.nodes}
    assert not any("attnlab" in t for t in targets)
    assert len(gm) == 1


def test_eager_calls_never_go_through_the_op():
    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.namespace)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        attnlab.attention(*inputs(16), "sliding_window", causal=True, window=4)
    assert "aten" in ops.seen and "attnlab" not in ops.seen


def _document_ids(T: int) -> dict:
    return {"document_ids": torch.arange(T) * 3 // T}


DYNAMIC_CASES = [("sliding_window", lambda T: {"window": 5}), ("document", _document_ids), ("linear", lambda T: {})]


def test_dynamic_lengths_compile_once():
    """One frame for three lengths: the layout is built inside the op from the real T and S;
    document_ids travel as a tensor with a symbolic length."""
    for name, opts in DYNAMIC_CASES:
        torch._dynamo.reset()
        counter = CompileCounter()
        fn = lambda q, k, v, o, name=name: attnlab.attention(q, k, v, name, causal=True, **o)  # noqa: E731
        compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
        for T in (24, 40, 57):
            q, k, v = inputs(T)
            torch.testing.assert_close(compiled(q, k, v, opts(T)), fn(q, k, v, opts(T)), atol=0, rtol=0)
        assert counter.frame_count == 1, name


def test_attention_module_with_rope_compiles_once_for_every_length():
    """RoPE's angles are computed in the graph while compiling: no table growth to specialize on."""
    torch.manual_seed(0)
    layer = Attention(32, 4, 2, "sliding_window", causal=True, rope=True, window=6)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    for T in (20, 33, 70):
        x = torch.randn(2, T, 32)
        torch.testing.assert_close(compiled(x), layer(x), atol=0, rtol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("mechanism", "opts"),
    [("sliding_window", {"window": 6}), ("streaming", {"sinks": 2, "window": 6}), ("document", {"lengths": (9, 15)})],
)
def test_attention_module_fullgraph_forward_backward(mechanism, opts):
    torch.manual_seed(0)
    layer = Attention(32, 4, 2, mechanism, causal=True, rope=True, **opts)
    x = torch.randn(2, 24, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fails on any graph break
    got = compiled(x)
    got.square().mean().backward()
    got_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    want = layer(x)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, p in zip(got_grads, layer.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_inductor_end_to_end():
    """The default backend: codegen around the op, forward and backward, against the oracle."""
    opts = {"sinks": 2, "window": 5}
    fn = lambda q, k, v: attnlab.attention(q, k, v, "streaming", causal=True, **opts)  # noqa: E731
    assert_matches_reference(torch.compile(fn, fullgraph=True), "streaming", True, opts)


def test_attention_lse_through_the_op():
    fn = lambda q, k, v: attnlab.attention_lse(q, k, v, "prefix_lm", causal=True, prefix=7)  # noqa: E731
    q, k, v = inputs(20)
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    want = fn(q, k, v)
    assert got.lse.dtype == want.lse.dtype == torch.float32
    torch.testing.assert_close(got.out, want.out, atol=0, rtol=0)
    torch.testing.assert_close(got.lse, want.lse, atol=0, rtol=0)


def test_precomputed_selection_breaks_once():
    """A selection object cannot travel through the op: the call runs eagerly behind one break."""
    q, k, v = inputs(32)
    opts = {"block_size": 8, "top_k": 2, "init_blocks": 1, "local_blocks": 1}
    sel = registry.get("block_topk").select(q, k, causal=True, **opts)

    def fn(q, k, v):  # ops before and after, as in a model: the break splits one graph in two
        return attnlab.attention(q * 1, k, v, "block_topk", causal=True, selection=sel, **opts) * 2

    assert graph_breaks(fn, q, k, v) == 1
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, k, v), fn(q, k, v), atol=0, rtol=0)


def test_tensor_option_that_requires_grad_breaks_once_and_keeps_its_gradient():
    q, k, v = inputs(30, grad=True)
    gate = torch.full((1, 4, 1, 1), 0.3, requires_grad=True)
    opts = {"window": 5, "pool": 3}
    fn = lambda q, k, v, g: attnlab.attention(q * 1, k, v, "global_local", causal=True, gate=g, **opts)  # noqa: E731
    assert graph_breaks(fn, q, k, v, gate) == 1
    torch.compile(fn, backend="aot_eager")(q, k, v, gate).sum().backward()
    got = gate.grad.clone()
    gate.grad = None
    fn(q, k, v, gate).sum().backward()
    torch.testing.assert_close(got, gate.grad)


def test_bad_input_raises_the_eager_error_under_compile():
    q, k, v = inputs(16)
    bad_option = torch.compile(lambda q, k, v: attnlab.attention(q, k, v, "sliding_window", window=0))
    with pytest.raises(ValueError, match="window must be a positive int"):
        bad_option(q, k, v)
    bad_rank = torch.compile(lambda q, k, v: attnlab.attention(q[0], k, v, "sliding_window", window=3))
    with pytest.raises(ValueError, match="q must be 4-D"):
        bad_rank(q, k, v)


def test_spec_round_trip_and_values_that_cannot_travel():
    ids = torch.arange(4)
    opts = {"shape": (2, 3), "gate": float("inf"), "kind": "elu+1", "ids": ids, "lst": [1, None, True], "x": 0.1}
    causal, back = attn_compile.decode(attn_compile.encode((True, False), opts))
    assert causal == (True, False) and back.pop("ids") is ids
    assert back == {n: x for n, x in opts.items() if n != "ids"}
    assert isinstance(back["shape"], tuple) and isinstance(back["lst"], list)
    assert attn_compile.encode(False, {"kind": 'a"b'}) is None
    assert attn_compile.encode(False, {"selection": object()}) is None


def test_operators_pass_opcheck():
    """Schema, fake (shapes, dtypes, strides), autograd registration and AOT dispatch agree."""
    q, k, v = inputs(12, grad=True)
    p = attn_compile.encode(True, {"document_ids": torch.tensor([0] * 5 + [1] * 7), "lengths": None})
    call = (p.tensors, p.ints, p.floats, "document", p.spec, 0.5, "auto")
    torch.library.opcheck(torch.ops.attnlab.attention_lse.default, (q, k, v, *call))

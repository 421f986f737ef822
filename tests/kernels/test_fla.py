"""The ``fla`` impl of linear and lightning (kernels/fla.py): flash-linear-attention's chunk kernels
behind our conventions.

Always run (no fla needed): the one-line reasons, auto's fallback to the torch chunked path, and
``impl="fla"`` refusing with its reason. With fla-core importable:

* ``test_mapping_matches_fla_naive_references``: our oracle equals fla's own pure-torch recurrences
  (``fla/ops/{linear_attn,simple_gla}/naive.py``, the library's statement of its semantics) under
  the mapping the bridge uses (features applied by us, scale passed through, log decays).
* ``test_fla_matches_oracle``: the bridge itself, forward and gradients, against our oracle, for
  every feature map, lightning decays, MHA/GQA, odd lengths across fla's 64-token chunks and causal
  cross attention both ways; fp32 to the contract's tolerances, fp16/bf16 by fla's own measure
  (see ``_compare_half``: fla keeps its chunk states in the input dtype).

Those and the tests after them need the kernels to run: on CUDA, or on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``). The interpreter needs two shims (``_interpreter_shims``) that
change how it runs kernels, not what fla computes; bf16 is skipped there because the interpreter
(NumPy has no bfloat16) returns garbage for it even from fla's kernels alone. On the GPU, fp32 runs
only with ``TRITON_F32_DEFAULT=ieee`` (else fla's dots are TF32 and the fp32 cases skip).
"""

import builtins
import os
import sys

import pytest
import torch

import attnlab
from attnlab.kernels import fla as bridge
from attnlab.mechanisms import lightning, linear
from attnlab.testing import LargestTensor, compare_to_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_KERNELS = bridge.available() and (DEVICE == "cuda" or INTERPRETED)
NEEDS_FLA = pytest.mark.skipif(not bridge.available(), reason="fla-core is not installed (pip install attnlab[cuda])")
NEEDS_KERNELS = pytest.mark.skipif(
    not RUNS_KERNELS, reason="fla's kernels need fla-core and CUDA, or TRITON_INTERPRET=1 on CPU"
)
VARIANTS = [("linear", {"feature_map": m}) for m in ("elu+1", "relu", "identity")] + [
    ("lightning", {}),  # SALA's ALiBi-slope decays, one per head
    ("lightning", {"decay": 0.5}),
]
IDS = [f"{n}-{o.get('feature_map', o.get('decay', 'alibi'))}" for n, o in VARIANTS]


def qkv(T, S, H=2, Hkv=2, B=2, D=16, Dv=24, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, Dv)


# -- always: reasons and fallback -----------------------------------------------------------------


def test_fla_is_the_first_impl_and_chunked_the_fallback():
    for name in ("linear", "lightning"):
        assert list(attnlab.get(name).impls) == ["fla", "chunked"]


def test_reasons(monkeypatch):
    q, k, v = qkv(8, 8)
    assert "causal only" in bridge.supports(q, k, v, False)
    assert "CUDA device, got cpu" in bridge.supports(q, k, v, True)
    monkeypatch.setattr(bridge, "DEVICES", ("cuda", "cpu"))
    assert "fp16, bf16 or fp32, got float64" in bridge.supports(q.double(), k.double(), v.double(), True)
    assert "empty sequence" in bridge.supports(q[:, :, :0], k, v, True)
    assert "empty sequence" in bridge.supports(q, k[:, :, :0], v[:, :, :0], True)
    monkeypatch.setattr(bridge, "_import", lambda: "ModuleNotFoundError: No module named 'fla'")
    assert "does not import; pip install 'attnlab[cuda]': ModuleNotFoundError" in bridge.supports(q, k, v, True)
    monkeypatch.setattr(bridge, "_import", lambda: (None, None))
    assert bridge.supports(q, k, v, True) is None


def test_a_cpu_call_never_imports_fla(monkeypatch):
    monkeypatch.setattr(bridge, "_import", lambda: pytest.fail("imported fla for a CPU call"))
    q, k, v = qkv(8, 8)
    attnlab.attention(q, k, v, "linear", causal=True)
    assert "CUDA device" in bridge.supports(q, k, v, True)


def test_fp32_needs_ieee_or_accepted_tf32(monkeypatch):
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    try:  # a settings object, not a plain attribute: monkeypatch.setattr cannot take it
        matmul.allow_tf32 = False
        assert "TF32" in bridge.fp32_reason()
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
        assert bridge.fp32_reason() is None
        monkeypatch.delenv("TRITON_F32_DEFAULT")
        matmul.allow_tf32 = True
        assert bridge.fp32_reason() is None
    finally:
        matmul.allow_tf32 = before


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_on_cpu_runs_the_chunked_path(name, opts, causal):
    q, k, v = qkv(37, 37, H=4)
    got = attnlab.attention(q, k, v, name, causal=causal, **opts)
    assert torch.equal(got, attnlab.attention(q, k, v, name, causal=causal, impl="chunked", **opts))


@pytest.mark.parametrize("name", ["linear", "lightning"])
def test_explicit_fla_refuses_with_its_reason(name, monkeypatch):
    q, k, v = qkv(8, 8)
    with monkeypatch.context() as m:  # a device fla would serve, but fla missing
        m.setattr(bridge, "DEVICES", ("cuda", "cpu"))
        m.setattr(bridge, "_import", lambda: "ModuleNotFoundError: No module named 'fla'")
        with pytest.raises(ValueError, match=f"impl 'fla' of {name} cannot run this call: .*does not import"):
            attnlab.attention(q, k, v, name, causal=True, impl="fla")
        assert torch.equal(  # and auto runs the torch path
            attnlab.attention(q, k, v, name, causal=True), attnlab.attention(q, k, v, name, causal=True, impl="chunked")
        )
    with pytest.raises(ValueError, match=f"impl 'fla' of {name} cannot run this call: .*CUDA device, got cpu"):
        attnlab.attention(q, k, v, name, causal=True, impl="fla")
    with pytest.raises(ValueError, match="causal only"):
        attnlab.attention(q, k, v, name, causal=False, impl="fla")
    with pytest.raises(ValueError, match="fla cannot run this call"):  # the direct call guards too
        linear.fla_chunked(q, k, v, causal=True)


# -- with fla: its own naive references ----------------------------------------------------------


@NEEDS_FLA
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
def test_mapping_matches_fla_naive_references(name, opts):
    """fla's recurrences over our features, with scale and log decays as the bridge maps them, equal
    our oracle (self attention: fla's naive forms have one length)."""
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    q, k, v = qkv(37, 37, H=2, Hkv=2, dtype=torch.float64)
    scale = 0.37
    want = attnlab.attention(q, k, v, name, causal=True, scale=scale, impl="reference", **opts)
    fmap = opts.get("feature_map", "identity")
    qf, kf = (linear.FEATURE_MAPS[fmap](x).transpose(1, 2).float() for x in (q, k))
    vf = v.transpose(1, 2).float()
    if name == "lightning":
        log_g = torch.log(lightning.decay_tensor(opts.get("decay"), 2)).float()
        got, _ = naive_recurrent_simple_gla(qf, kf, vf, log_g.expand(2, 37, 2), scale=scale)
    else:
        got, _ = naive_recurrent_linear_attn(qf, kf, vf, scale=scale, normalize=linear.NORMALIZED[fmap])
    torch.testing.assert_close(got.transpose(1, 2).double(), want, atol=2e-5, rtol=2e-5)


# -- with fla's kernels: the bridge against our oracle -------------------------------------------


def _interpreter_shims():
    """Two things Triton's CPU interpreter cannot do that fla's kernels need: benchmark autotune
    configs (there is no driver: take the first config), and ``.to()`` on a ``range`` index (the
    interpreter yields Python ints: give them a ``.to`` that makes the interpreter's scalar)."""
    import triton.runtime.autotuner as autotuner
    from triton.runtime.interpreter import _implicit_cvt

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]

    class Index(int):
        def to(self, dtype, **kwargs):
            return _implicit_cvt(int(self)).to(dtype, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None:
            module.__dict__["range"] = lambda *a: map(Index, builtins.range(*a))


@pytest.fixture
def kernels(monkeypatch):
    """On CPU: the interpreter shims (once) and "cpu" among the bridge's devices (this test only)."""
    if DEVICE == "cpu":
        if not getattr(bridge, "_shimmed", False):
            _interpreter_shims()
            bridge._shimmed = True
        monkeypatch.setattr(bridge, "DEVICES", ("cuda", "cpu"))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, S, H, Hkv): odd self lengths across fla's 64-token chunks, GQA, causal cross both ways
SHAPES = [(70, 70, 4, 2), (37, 37, 2, 2), (13, 77, 4, 2), (40, 23, 2, 2)]


def _rms_ratio(got, want) -> float:
    return ((got.double() - want.double()).square().mean().sqrt() / want.double().square().mean().sqrt()).item()


def _compare_half(name, q, k, v, opts) -> list[str]:
    """fp16/bf16: fla keeps its chunk states in the input dtype (``states_in_fp32=False`` in
    ``fla/ops/simple_gla/chunk.py``'s forward), so its error follows the states' magnitude, not
    each output element's: an element near 0 can be off by the state's rounding. We judge it as
    fla's own tests do, by the RMS error relative to the oracle's RMS (``fla/utils/testing.py``),
    within 4 eps of the dtype; a mapping error (scale, position, decay, normalizer) is far above."""
    limit = 4 * torch.finfo(q.dtype).eps
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    got = attnlab.attention(*leaves, name, causal=True, scale=0.3, impl="fla", **opts)
    want = attnlab.attention(*ref, name, causal=True, scale=0.3, impl="reference", **opts)
    upstream = torch.randn_like(want)
    pairs = [("out", got, want)]
    pairs += zip(
        ("dq", "dk", "dv"), torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, ref, upstream)
    )
    problems = [f"{n}: non-finite" for n, a, _ in pairs if not torch.isfinite(a).all()]
    problems += [f"{n}: rms error ratio {r:.2e} > {limit:.2e}" for n, a, b in pairs if (r := _rms_ratio(a, b)) > limit]
    return problems + ([] if got.dtype == q.dtype else [f"out dtype {got.dtype}"])


@NEEDS_KERNELS
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-S{s}-H{h}kv{g}" for t, s, h, g in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=IDS)
def test_fla_matches_oracle(kernels, name, opts, dtype, shape):
    """fp32 to the contract's tolerances (compare_to_reference), fp16/bf16 as in _compare_half."""
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("Triton's interpreter mis-computes bf16 (fla's kernels alone give ~1e10 errors)")
    if dtype == torch.float32 and DEVICE == "cuda" and bridge.fp32_reason() is not None:
        pytest.skip("fp32 on the GPU needs TRITON_F32_DEFAULT=ieee (fla's dots are TF32 otherwise)")
    T, S, H, Hkv = shape
    q, k, v = qkv(T, S, H, Hkv, dtype=dtype, device=DEVICE, seed=T * S + H)
    assert bridge.supports(q, k, v, True) is None
    if dtype == torch.float32:
        problems = compare_to_reference(name, q, k, v, impl="fla", causal=True, scale=0.3, **opts)
    else:
        problems = _compare_half(name, q, k, v, opts)
    assert not problems, problems


@NEEDS_KERNELS
def test_rows_before_the_first_key_are_exactly_zero(kernels):
    q, k, v = (t.requires_grad_() for t in qkv(9, 5, 2, 2, device=DEVICE))
    for name in ("linear", "lightning"):
        out = attnlab.attention(q, k, v, name, causal=True, impl="fla")
        assert (out[:, :, :4] == 0).all() and out[:, :, 4:].abs().amin(-1).gt(0).all()
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads) and (grads[0][:, :, :4] == 0).all()


@NEEDS_KERNELS
@pytest.mark.parametrize("name", ["linear", "lightning"])
def test_auto_runs_fla_for_causal_and_chunked_otherwise(kernels, monkeypatch, name):
    calls = []
    causal = bridge.causal
    monkeypatch.setattr(bridge, "causal", lambda *a, **kw: calls.append(1) or causal(*a, **kw))
    q, k, v = qkv(70, 70, 4, 2, device=DEVICE, dtype=torch.float16)
    got = attnlab.attention(q, k, v, name, causal=True)
    assert calls == [1]
    assert torch.equal(got, attnlab.attention(q, k, v, name, causal=True, impl="fla"))
    attnlab.attention(q, k, v, name, causal=False)
    assert calls == [1, 1]  # the non-causal call ran the torch path


@NEEDS_KERNELS
def test_no_t_by_s_tensor(kernels):
    """Every tensor torch allocates around and inside the bridge (fla's kernels allocate through
    torch too) is linear in the length, with the denominator's temporaries included."""
    T = 512
    q, k, v = qkv(T, T, 2, 2, D=8, Dv=8, device=DEVICE)
    for name, opts in (("linear", {"feature_map": "elu+1"}), ("lightning", {})):
        with LargestTensor() as probe, torch.no_grad():
            attnlab.attention(q, k, v, name, causal=True, impl="fla", **opts)
        assert 0 < probe.numel < T * T

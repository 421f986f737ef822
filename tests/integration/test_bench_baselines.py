"""The benchmark's baselines: compiled Flex under a row's own mask (CPU forward here; CUDA adds the
backward), and the bridge to flash-linear-attention, checked on the CPU against a stand-in `fla`
written from fla's documented conventions ([B, T, H, D] tensors, per-head log decay ``g_gamma``,
``normalize`` dividing by q . cumsum(k)), so our mapping of layouts, scale, feature maps and decays
is tested here even though fla's Triton kernels need a GPU."""

import sys
import types

import pytest
import torch

import attnlab
from attnlab.bench import baselines
from attnlab.mechanisms import lightning


def _causal_decay(T: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """[H, T, T]: gamma_h ** (t - j) on and below the diagonal, 0 above."""
    dist = (torch.arange(T).view(-1, 1) - torch.arange(T).view(1, -1)).to(log_gamma.dtype)
    return torch.exp(log_gamma.view(-1, 1, 1) * dist.clamp(min=0)) * (dist >= 0)


def _fake_fla(monkeypatch, flip_decay: bool = False):
    """Install a naive `fla` with the two entry points the bridge calls ([B, T, H, D] in and out)."""

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False):
        T, H = q.shape[1], q.shape[2]
        log_gamma = torch.zeros(H) if g_gamma is None else g_gamma.to(q.dtype)
        if flip_decay:
            log_gamma = -log_gamma * 2
        w = torch.einsum("bthd,bshd->bhts", q, k) * scale * _causal_decay(T, log_gamma)
        return torch.einsum("bhts,bshd->bthd", w, v), None

    def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True):
        o, _ = chunk_simple_gla(q, k, v, scale=scale)
        if normalize:
            o = o / (q * scale * k.cumsum(1)).sum(-1, keepdim=True)
        return o, None

    fla = types.ModuleType("fla")
    ops, la, sg = (types.ModuleType(n) for n in ("fla.ops", "fla.ops.linear_attn", "fla.ops.simple_gla"))
    la.chunk_linear_attn, sg.chunk_simple_gla = chunk_linear_attn, chunk_simple_gla
    fla.ops, ops.linear_attn, ops.simple_gla = ops, la, sg
    for name, mod in (("fla", fla), ("fla.ops", ops), ("fla.ops.linear_attn", la), ("fla.ops.simple_gla", sg)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize(
    ("name", "opts"),
    [("linear", {}), ("linear", {"feature_map": "relu"}), ("lightning", {}), ("lightning", {"decay": 0.8})],
)
def test_fla_bridge_computes_our_mechanism(monkeypatch, name, opts):
    _fake_fla(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 40, 16, generator=g, dtype=torch.float64)  # GQA: 4 query heads, 2 kv heads

    def ours(q, k, v):
        return attnlab.attention(q, k, v, name, causal=True, **opts)

    base = baselines.fla_baseline(name, opts, True, q, k, v, "fwd", ours)
    assert isinstance(base, baselines.Baseline) and base.note == "" and base.first_s > 0
    got = baselines._fla_call(name, opts, q, k, v)()
    tol = 1e-9 if name == "linear" else 1e-4  # fla takes the log decay in fp32, whatever q's dtype
    torch.testing.assert_close(got, ours(q, k, v), atol=tol, rtol=tol)
    base.step()  # the timed call runs as is
    grads = baselines.fla_baseline(name, opts, True, *(t.requires_grad_() for t in (q, k, v)), "fwd+bwd", ours)
    grads.step()
    assert q.grad is None  # the step clears what it accumulated, so repeats time the same work


def test_fla_bridge_reports_a_convention_mismatch_and_what_it_cannot_run(monkeypatch):
    _fake_fla(monkeypatch, flip_decay=True)
    q, k, v = torch.randn(3, 1, 2, 24, 8)
    ours = lambda q, k, v: attnlab.attention(q, k, v, "lightning", causal=True)  # noqa: E731
    base = baselines.fla_baseline("lightning", {}, True, q, k, v, "fwd", ours)
    assert base.note.startswith("fla output differs from ours")
    with pytest.raises(baselines.BaselineUnavailable, match="^fla: causal self-attention only$"):
        baselines.fla_baseline("lightning", {}, False, q, k, v, "fwd", ours)
    assert lightning.decay_tensor(None, 2).shape == (2,)  # the default per-head decay the bridge uses
    assert baselines.fla_status("cpu") == "fla baseline: skipped, its kernels are Triton (CUDA only)"


def test_flex_baseline_times_the_same_mask_on_cpu():
    T = 128
    lay = attnlab.get("sliding_window").block_layout(T, T, causal=True, window=16)
    q, k, v = torch.randn(3, 1, 2, T, 16)
    with pytest.raises(baselines.BaselineUnavailable, match=r"^flex: forward only on the CPU \("):
        baselines.flex_baseline(lay, q, k, v, "fwd+bwd")
    try:
        base = baselines.flex_baseline(lay, q, k, v, "fwd")
    except baselines.BaselineUnavailable as e:  # no C++ toolchain for torch.compile here: the reason
        assert str(e).startswith("flex unavailable: ")
        return
    assert base.first_s > 0
    base.step()

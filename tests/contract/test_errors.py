"""One test per class of bad input: each raises a clear error naming the argument. A mechanism's own
option errors live in its file, tests/mechanisms/test_<name>.py."""

import pytest
import torch

import attnlab
from attnlab.spec import PATTERNS


def qkv(B=1, H=2, Hkv=2, T=8, S=8, D=4, Dv=4, dtype=torch.float32):
    return (
        torch.randn(B, H, T, D, dtype=dtype),
        torch.randn(B, Hkv, S, D, dtype=dtype),
        torch.randn(B, Hkv, S, Dv, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: (torch.randn(2, 8, 4), *qkv()[1:]), "q must be 4-D"),
        (lambda: (qkv()[0], torch.randn(1, 2, 8, 5), qkv()[2]), "k head dim"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 7, 4)), "v must be"),
        (lambda: (qkv(B=2)[0], *qkv()[1:]), "batch sizes"),
        (lambda: qkv(H=3, Hkv=2), "multiple of kv heads"),
        (lambda: (qkv()[0].double(), *qkv()[1:]), "share a dtype"),
        (lambda: tuple(t.long() for t in qkv()), "floating"),
    ],
    ids=["rank", "head-dim", "v-shape", "batch", "gqa", "dtype-mismatch", "dtype-int"],
)
def test_bad_tensors(make, match):
    with pytest.raises(ValueError, match=match):
        attnlab.attention(*make())


def test_wrong_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attnlab.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnlab.attention(q, k, v, causal="yes")


def test_unknown_mechanism_impl_and_option_list_the_valid_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown mechanism 'nope'; valid: dense, sliding_window"):
        attnlab.attention(q, k, v, "nope")
    with pytest.raises(ValueError, match="unknown impl 'fast'.*valid: auto, reference, blocksparse"):
        attnlab.attention(q, k, v, "sliding_window", impl="fast")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\]; it accepts: window"):
        attnlab.attention(q, k, v, "sliding_window", windw=3)
    with pytest.raises(ValueError, match="unknown mechanism"):
        attnlab.mask("nope", 4, 4)


def test_explicit_impl_that_cannot_run_says_why():
    q, k, v = qkv(T=4, S=8)
    with pytest.raises(
        ValueError, match="impl 'sdpa' of dense cannot run this call: SDPA aligns causal masks top-left"
    ):
        attnlab.attention(q, k, v, "dense", causal=True, impl="sdpa")


REFUSED = [(m.name, p) for m in attnlab.registry.MECHANISMS for p in PATTERNS if p not in m.patterns]


@pytest.mark.parametrize(("name", "pattern"), REFUSED, ids=[f"{n}-{p}" for n, p in REFUSED])
def test_unsupported_patterns_are_refused_not_ignored(name, pattern):
    """Every pattern a record leaves out of ``patterns`` raises, naming the mechanism, rather than
    running another pattern (each mechanism's own message is tested in its file)."""
    q, k, v = qkv(T=8 if pattern.startswith("self") else 4, S=8)
    with pytest.raises(ValueError, match=f"^{name} "):
        attnlab.attention(q, k, v, name, causal=pattern.endswith("causal"), **attnlab.get(name).example(8))


def test_bad_scale_and_block_size():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attnlab.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="block_size q must be a positive int"):
        with attnlab.kernels.block_size(0):
            pass


def test_a_device_the_record_does_not_serve_is_refused(monkeypatch):
    """``devices`` on the record is enforced before any compute; meta (shapes only) always passes."""
    import dataclasses

    from attnlab import registry
    from attnlab.testing import devices

    mech = attnlab.get("sliding_window")
    cuda_only = dataclasses.replace(mech, devices=frozenset({"cuda"}))
    monkeypatch.setitem(registry._BY_NAME, "sliding_window", cuda_only)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="sliding_window runs on cuda; q, k, v are on cpu"):
        attnlab.attention(q, q, q, "sliding_window", window=3)
    assert devices("sliding_window") == (["cuda"] if torch.cuda.is_available() else [])
    cuda_only.check_device(torch.device("meta"))  # no raise: the device guards trace on meta
    with pytest.raises(ValueError, match="runs on cuda"):
        cuda_only.check_device(torch.device("cpu"))


def _mask(T, S, **kw):
    return attnlab.mask("sliding_window", T, S, window=2, **kw)


def _layout(T, S, **kw):
    return attnlab.get("sliding_window").block_layout(T, S, window=2, **kw)


@pytest.mark.parametrize("build", [_mask, _layout], ids=["mask", "block_layout"])
@pytest.mark.parametrize(
    ("sizes", "kw", "match"),
    [
        ((-4, 4), {}, "T must be a non-negative int, got -4"),
        ((4, -1), {}, "S must be a non-negative int, got -1"),
        ((True, 4), {}, "T must be a non-negative int, got True"),
        ((4, 4.0), {}, "S must be a non-negative int, got 4.0"),
        ((4, 4), {"kv_heads": 0}, "kv_heads must be a positive int, got 0"),
    ],
    ids=["negative-T", "negative-S", "bool", "float", "kv-heads"],
)
def test_bad_sizes_of_mask_and_layout(build, sizes, kw, match):
    """Sizes given by hand are checked before any tensor is built (not arange's RuntimeError)."""
    with pytest.raises(ValueError, match=match):
        build(*sizes, **kw)


def test_causal_must_be_a_bool_everywhere():
    q, k, v = qkv()
    calls = [
        lambda: attnlab.attention(q, k, v, "sliding_window", causal="yes", window=2),
        lambda: _mask(8, 8, causal="yes"),
        lambda: _layout(8, 8, causal="yes"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="causal must be a bool, got str"):
            call()

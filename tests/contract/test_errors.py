"""One test per class of bad input: each raises a clear error naming the argument."""

import pytest
import torch

import attnlab


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


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("sliding_window", {"window": 0}, "window must be a positive int"),
        ("sliding_window", {"window": 2.5}, "window must be a positive int"),
        ("streaming", {"sinks": -1}, "sinks must be a non-negative int"),
        (
            "neighborhood",
            {"shape": (2, 4), "kernel_size": (3, 3)},
            "kernel_size \\* dilation must be <= the axis length",
        ),
        ("neighborhood", {"shape": (2, 4), "kernel_size": (1, 2, 3)}, "kernel_size must be an int or a tuple of 2"),
        ("neighborhood", {"shape": (2, 5)}, "need T == S == prod\\(shape\\)"),
        ("halo", {}, "halo needs shape"),
        ("halo", {"shape": (3, 3), "block_size": 2}, "divisible by block_size"),
        ("halo", {"shape": (2, 4), "block_size": 2, "halo": -1}, "halo must be a non-negative int"),
        ("document", {}, "exactly one of lengths"),
        ("document", {"lengths": (3, 4)}, "summing to the key length S=8"),
        ("document", {"document_ids": torch.zeros(7, dtype=torch.long)}, "document_ids must be"),
        ("document", {"document_ids": torch.zeros(8)}, "document_ids must be an integer tensor"),
        ("prefix_lm", {"prefix": 9}, "prefix must be <= the key length"),
    ],
)
def test_bad_options(name, opts, match):
    q, k, v = qkv()
    causal = name == "prefix_lm"
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, name, causal=causal, **opts)


def test_unsupported_patterns_are_refused_not_ignored():
    q, k, v = qkv(T=16, S=16)
    with pytest.raises(ValueError, match="halo attention is non-causal"):
        attnlab.attention(q, k, v, "halo", causal=True, shape=(4, 4), block_size=2)
    with pytest.raises(ValueError, match="prefix_lm is causal after its prefix by definition"):
        attnlab.attention(q, k, v, "prefix_lm", prefix=2)
    q, k, v = qkv(T=4, S=16)
    with pytest.raises(ValueError, match="self-attention over a grid"):
        attnlab.attention(q, k, v, "neighborhood", shape=(4, 4), kernel_size=3)


def test_bad_scale_and_block_size():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attnlab.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="block_size q must be a positive int"):
        with attnlab.kernels.block_size(0):
            pass


def test_document_ids_batch_must_match():
    q, k, v = qkv(B=3)
    with pytest.raises(ValueError, match="document_ids has batch 2 but q has batch 3"):
        attnlab.attention(q, k, v, "document", document_ids=torch.zeros(2, 8, dtype=torch.long))

"""Context-parallel sharding layouts: partitions, exact shard/unshard inverses, the area measure
against the dense mask, area balance on skewed masks, and the errors of bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.distributed import area, balanced, contiguous, imbalance, row_area, shard, unshard, zigzag

SKEWED = {"lengths": (640,) + (32,) * 12}  # one long document, then many short ones: T = 1024


def make(kind: str, T: int, W: int):
    if kind == "balanced":
        return balanced(T, W, "sliding_window", causal=True, block=1, window=5)
    return {"contiguous": contiguous, "zigzag": zigzag}[kind](T, W)


def check_partition(s) -> None:
    held = [s.positions(r) for r in range(s.world)]
    for p in held:
        assert p.dtype == torch.int64 and torch.all(p[1:] > p[:-1])  # sorted, no repeats
    assert torch.equal(torch.cat(held).sort().values, torch.arange(s.length))  # disjoint and complete
    assert [len(p) for p in held] == s.sizes()


@pytest.mark.parametrize("kind", ["contiguous", "zigzag", "balanced"])
@pytest.mark.parametrize("T, W", [(64, 4), (37, 4), (9, 1)])
@pytest.mark.parametrize("dim", [1, 2, -2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_shard_unshard_inverse(kind, T, W, dim, dtype):
    s = make(kind, T, W)
    check_partition(s)
    shape = [2, 3, 5]
    shape.insert(dim % 4, T)  # T on ``dim`` of a 4-d tensor
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    parts = [shard(x, s, r, dim=dim) for r in range(W)]
    for r, p in enumerate(parts):
        assert torch.equal(p, x.index_select(dim % 4, s.positions(r)))
    assert torch.equal(unshard(parts, s, dim=dim), x)


@settings(max_examples=40)
@given(T=st.integers(1, 200), W=st.integers(1, 9), kind=st.sampled_from(["contiguous", "zigzag", "balanced"]))
def test_fuzz_partition_and_inverse(T, W, kind):
    if T < W or (kind == "zigzag" and T < 2 * W):
        with pytest.raises(ValueError, match="T"):
            make(kind, T, W)
        return
    s = make(kind, T, W)
    check_partition(s)
    x = torch.randn(1, 2, T, 3, dtype=torch.float64)
    assert torch.equal(unshard([shard(x, s, r) for r in range(W)], s), x)


def test_unshard_is_differentiable():
    s = zigzag(37, 4)
    x = torch.randn(1, 2, 37, 3, dtype=torch.float64, requires_grad=True)
    unshard([shard(x, s, r) * (r + 1) for r in range(4)], s).sum().backward()
    owner = torch.empty(37)
    for r in range(4):
        owner[s.positions(r)] = r + 1.0
    assert torch.equal(x.grad, owner.view(1, 1, 37, 1).expand_as(x).double())


def test_contiguous_sizes_differ_by_at_most_one():
    s = contiguous(37, 4)
    assert s.sizes() == [10, 9, 9, 9] and s.ranges[0] == ((0, 10),)


def test_zigzag_chunk_rule():
    T, W = 37, 4
    bounds = [0, 5, 10, 15, 20, 25, 29, 33, 37]  # 2W = 8 chunks: the first 37 % 8 = 5 hold 5 tokens
    chunk = [torch.arange(bounds[i], bounds[i + 1]) for i in range(2 * W)]
    s = zigzag(T, W)
    for r in range(W):
        assert torch.equal(s.positions(r), torch.cat([chunk[r], chunk[2 * W - 1 - r]]))


@pytest.mark.parametrize(
    "name, options",
    [("dense", {}), ("sliding_window", {"window": 7}), ("document", SKEWED), ("document", "per-row"), ("region", None)],
)
def test_row_area_counts_the_dense_mask(name, options):
    T = 1024 if name == "document" else 100
    opts = attnlab.get(name).example(T) if options is None else options
    if options == "per-row":  # a batch of two packings: the layout has one slice per batch row
        opts = {"document_ids": torch.stack([torch.arange(T) // 300, torch.arange(T) // 70])}
    causal = name != "region"  # region's grid order (a permuted layout) is for bidirectional masks
    with attnlab.kernels.block_size(16):
        rows = row_area(T, name, causal=causal, **opts)
    dense = attnlab.get(name).dense_mask(T, T, causal=causal, **opts)  # [B|1, Hkv|1, T, T]
    assert torch.equal(rows, dense.sum(dim=(0, 1, 3)))
    s = zigzag(T, 3)
    expect = torch.stack([dense.sum(dim=(0, 1, 3))[s.positions(r)].sum() for r in range(3)])
    assert torch.equal(area(s, name, causal=causal, **opts), expect)


def test_balanced_evens_a_skewed_document_mask():
    T, W = 1024, 4
    even = balanced(T, W, "document", causal=True, block=16, **SKEWED)
    assert even.kind == "balanced" and all(len(rs) == 1 for rs in even.ranges)  # one range per rank
    check_partition(even)
    assert all(rs[0][0] % 16 == 0 for rs in even.ranges)  # cuts on query-block boundaries
    assert imbalance(even, "document", causal=True, **SKEWED) <= 1.1
    assert imbalance(contiguous(T, W), "document", causal=True, **SKEWED) > 1.1


def test_balanced_beats_contiguous_on_dense_causal():
    T, W = 1024, 4
    plain = imbalance(contiguous(T, W), "dense", causal=True)
    assert plain > 1.7  # the last rank's queries see 7x the first's keys
    assert imbalance(balanced(T, W, "dense", causal=True), "dense", causal=True) < 1.2 < plain
    assert imbalance(balanced(T, W, "dense", causal=True, block=16), "dense", causal=True) < 1.05


# -- bad input: one test per class --------------------------------------------------------------


@pytest.mark.parametrize("world", [0, -1, 2.0, True])
def test_world_must_be_positive(world):
    with pytest.raises(ValueError, match="world"):
        contiguous(8, world)


def test_T_at_least_world():
    with pytest.raises(ValueError, match="T must be >= world"):
        contiguous(3, 4)
    with pytest.raises(ValueError, match="zigzag needs T >= 2"):
        zigzag(7, 4)
    with pytest.raises(ValueError, match="pass a smaller block"):
        balanced(128, 4, "dense", causal=True, block=64)


def test_length_mismatch():
    with pytest.raises(ValueError, match="x has length 10 on dim 2 but the sharding is for T=12"):
        shard(torch.zeros(1, 1, 10, 4), contiguous(12, 2), 0)


@pytest.mark.parametrize("rank", [-1, 2, 1.0])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        shard(torch.zeros(1, 1, 12, 4), contiguous(12, 2), rank)


def test_bad_dim():
    with pytest.raises(ValueError, match="dim must be an int in"):
        shard(torch.zeros(12, 4), contiguous(12, 2), 0, dim=2)


def test_wrong_parts():
    s = contiguous(12, 3)
    x = torch.zeros(1, 1, 12, 4)
    with pytest.raises(ValueError, match="parts must be a list of world=3 tensors, got 2"):
        unshard([shard(x, s, 0), shard(x, s, 1)], s)
    with pytest.raises(ValueError, match=r"parts\[1\] must have 4 positions"):
        unshard([shard(x, s, 0), shard(x, s, 0)[:, :, :3], shard(x, s, 2)], s)


def test_wrong_types():
    s = contiguous(12, 2)
    with pytest.raises(ValueError, match="sharding must be a Sharding"):
        shard(torch.zeros(1, 1, 12, 4), "zigzag", 0)
    with pytest.raises(ValueError, match="x must be a Tensor"):
        shard([0.0] * 12, s, 0)
    with pytest.raises(ValueError, match="parts must hold Tensors"):
        unshard([[0.0] * 6, [0.0] * 6], s)


@pytest.mark.parametrize("name", ["block_topk", "linear"])
def test_balanced_refuses_data_dependent_mechanisms(name):
    with pytest.raises(ValueError, match=f"{name} is a .* no fixed block layout.*contiguous.*zigzag"):
        balanced(256, 4, name, causal=True)
    with pytest.raises(ValueError, match="no fixed block layout"):
        area(contiguous(256, 4), name, causal=True)


def test_permuted_layouts_are_refused_by_balanced():
    opts = attnlab.get("region").example(256)
    with pytest.raises(ValueError, match="region permutes tokens"):
        balanced(256, 4, "region", **opts)


def test_positions_on_device():
    assert contiguous(8, 2).positions(1, device="meta").device.type == "meta"
    x = torch.zeros(1, 1, 8, 2, device="meta")
    assert shard(x, zigzag(8, 2), 1).device.type == "meta"

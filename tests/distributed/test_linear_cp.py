"""Context parallelism for the linear family over real gloo process groups (loopback, spawned
ranks): forward and gradients equal to single-process ``attnlab.attention``, communication
independent of T, disagreement between ranks refused on every rank, non-linear mechanisms refused.

Spawning is slow, so each spawn runs many cases per rank and returns what it measured."""

from __future__ import annotations

import time

import pytest
import torch
from _ranks import run_ranks

import attnlab
import attnlab.distributed.linear as cp
from attnlab.distributed import contiguous, linear_cp

CASES = [
    (mech, opts, causal)
    for mech, opts in [
        ("linear", {}),
        ("linear", {"feature_map": "relu"}),
        ("linear", {"feature_map": "identity"}),
        ("lightning", {}),
        ("lightning", {"decay": 0.8}),
    ]
    for causal in (True, False)
]
B, H, HKV, D, DV = 2, 4, 2, 8, 6  # GQA: two query heads per kv head
T = 13  # not divisible by 2 or 4


def _inputs(seed: int, T: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=g, dtype=torch.float64) for h, d in ((H, D), (HKV, D), (HKV, DV))]


def _exactness(rank: int, world: int) -> list[tuple[str, float]]:
    """Max |distributed - single process| of out, dq, dk, dv for every case, on this rank."""
    lo, hi = contiguous(T, world).ranges[rank][0]
    errors = []
    for seed, (mech, opts, causal) in enumerate(CASES):
        q, k, v = (t.requires_grad_() for t in _inputs(seed, T))
        full = attnlab.attention(q, k, v, mech, causal=causal, chunk_size=4, **opts)
        grad_out = torch.randn(full.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=full.dtype)
        full.backward(grad_out)
        local = [t.detach()[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
        out = linear_cp(*local, mech, causal=causal, chunk_size=4, **opts)
        out.backward(grad_out[:, :, lo:hi])
        diffs = [(out - full[:, :, lo:hi]).abs().max()]
        diffs += [(a.grad - b.grad[:, :, lo:hi]).abs().max() for a, b in zip(local, (q, k, v), strict=True)]
        errors.append((f"{mech} {opts} causal={causal}", max(float(d.detach()) for d in diffs)))
    return errors


def _bytes_and_mismatch(rank: int, world: int) -> dict:
    """Bytes this rank sends through the state all_gather at T=64 and T=128, and the error each rank
    gets when rank 1 alone passes another chunk_size."""
    sent = []
    real = cp._all_gather

    def counting(tensor, group=None):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, group=group)

    cp._all_gather = counting
    result = {}
    for mech, causal in (("linear", True), ("lightning", False)):
        for length in (64, 128):
            lo, hi = contiguous(length, world).ranges[rank][0]
            q, k, v = (t[:, :, lo:hi] for t in _inputs(0, length))
            sent.clear()
            linear_cp(q, k, v, mech, causal=causal)
            result[(mech, causal, length)] = sum(sent)
    q, k, v = (t[:, :, :4] for t in _inputs(0, 4))
    try:
        linear_cp(q, k, v, "linear", causal=True, chunk_size=8 if rank == 1 else 4)
        result["mismatch"] = None
    except ValueError as e:
        result["mismatch"] = str(e)
    try:  # a different mechanism, hence a different number of options, still meets and is named
        linear_cp(q, k, v, "lightning" if rank == 0 else "linear", causal=True)
        result["mechanism"] = None
    except ValueError as e:
        result["mechanism"] = str(e)
    return result


def _everything(rank: int, world: int) -> tuple[list, dict]:
    return _exactness(rank, world), _bytes_and_mismatch(rank, world), _absent_rank(rank)


def _absent_rank(rank: int):
    """Rank 1 stays alive but never calls linear_cp: rank 0 must raise within its timeout (1 s), long
    before rank 1 leaves (3 s), not hang. Last: the group is unusable afterwards."""
    if rank == 1:
        time.sleep(3.0)
        return None
    q, k, v = (t[:, :, :4] for t in _inputs(0, 4))
    start = time.monotonic()
    try:
        linear_cp(q, k, v, "linear", causal=True, timeout=1.0)
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError (timeout) or a connection error
        return type(e).__name__, time.monotonic() - start
    return None


def _check_exactness(world: int, rank: int, errors: list) -> None:
    assert len(errors) == len(CASES)
    for case, err in errors:
        assert err < 1e-10, f"world={world} rank={rank} {case}: max error {err:.3g}"


def test_world_2_exact_communication_independent_of_T_disagreement_and_absent_rank_raise():
    ranks = run_ranks(_everything, 2, timeout=55)
    raised = ranks[0][2]
    assert raised is not None and raised[1] < 2.5, f"rank 0 with rank 1 absent: {raised}"
    for rank, (errors, result, _) in enumerate(ranks):
        _check_exactness(2, rank, errors)
        for mech, causal in (("linear", True), ("lightning", False)):
            short, long = result[(mech, causal, 64)], result[(mech, causal, 128)]
            assert short == long > 0, f"rank {rank} {mech}: sent {short} bytes at T=64, {long} at T=128"
        # linear: kv [B, H, D, Dv] + z [B, H, D] in fp64; lightning non-causal: two kv states
        assert result[("linear", True, 64)] == B * H * (D * DV + D) * 8
        assert result[("lightning", False, 64)] == 2 * B * H * D * DV * 8
        assert result["mismatch"] is not None and "option 'chunk_size'" in result["mismatch"], result["mismatch"]
        assert result["mechanism"] is not None and "disagree on mechanism" in result["mechanism"], result["mechanism"]


def test_world_4_forward_and_gradients_equal_single_process():
    for rank, errors in enumerate(run_ranks(_exactness, 4, timeout=55)):
        _check_exactness(4, rank, errors)


def test_refuses_a_non_linear_mechanism():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="sliding_window.*ring/Ulysses, not built yet"):
        linear_cp(q, q, q, "sliding_window", causal=True, window=4)

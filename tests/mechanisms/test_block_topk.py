"""Block top-k (InfLLM-V2-style) selection: the rule, ties, budgets, reuse."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.block_topk import select


def brute_select(q, k, causal, beta, top_k, init, local):
    """The docstring's rule, one query block at a time, in plain Python."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    nQB, nKB = math.ceil(T / beta), math.ceil(S / beta)
    keep = torch.zeros(B, Hkv, nQB, nKB, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            heads = range(h * H // Hkv, (h + 1) * H // Hkv)
            for n in range(nQB):
                rows = range(n * beta, min((n + 1) * beta, T))
                qbar = torch.stack([q[b, g, i].float() for g in heads for i in rows]).mean(0)
                p0, p1 = rows[0] + S - T, rows[-1] + S - T
                if p1 < 0:
                    continue
                own = p1 // beta if causal else max(p0, 0) // beta
                cands = []
                for m in range(nKB):
                    if causal and m * beta > p1:
                        continue
                    kbar = k[b, h, m * beta : (m + 1) * beta].float().mean(0)
                    forced = m < init or (abs(own - m) < local and (m <= own or not causal))
                    score = float("inf") if forced else float(qbar @ kbar) * D**-0.5
                    cands.append((score, m))
                for _, m in sorted(cands, key=lambda c: (-c[0], -c[1]))[:top_k]:
                    keep[b, h, n, m] = True
    return keep


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "S"), [(37, 37), (11, 29), (30, 13)])
def test_selection_matches_the_rule(causal, T, S):
    torch.manual_seed(T + S)
    q = torch.randn(2, 4, T, 8)
    k = torch.randn(2, 2, S, 8)
    sel = select(q, k, causal=causal, block_size=4, top_k=4, init_blocks=1, local_blocks=1)
    assert torch.equal(sel.blocks, brute_select(q, k, causal, 4, 4, 1, 1))


def test_ties_prefer_recent_blocks():
    q = torch.ones(1, 1, 32, 4)
    k = torch.ones(1, 1, 32, 4)  # every block scores the same
    sel = select(q, k, causal=True, block_size=4, top_k=3, init_blocks=0, local_blocks=1)
    assert sel.blocks[0, 0, 7].nonzero().flatten().tolist() == [5, 6, 7]


def test_budget_covering_everything_equals_dense():
    q = torch.randn(1, 4, 50, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 50, 8, dtype=torch.float64)
    for causal in (False, True):
        out = attnlab.attention(q, k, v, "block_topk", causal=causal, block_size=8, top_k=7)
        torch.testing.assert_close(out, attnlab.attention(q, k, v, causal=causal))


def test_selection_can_be_reused_by_a_later_call():
    q, q2 = torch.randn(2, 1, 2, 64, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 64, 8, dtype=torch.float64)
    sel = attnlab.get("block_topk").select(q, k, causal=True, block_size=8, top_k=3, init_blocks=1, local_blocks=1)
    out = attnlab.attention(q2, k, v, "block_topk", causal=True, selection=sel)
    ref = attnlab.reference.attention(q2, k, v, sel.dense_mask())
    torch.testing.assert_close(out, ref.out)
    fresh = attnlab.attention(q2, k, v, "block_topk", causal=True, block_size=8, top_k=3, local_blocks=1)
    assert not torch.allclose(out, fresh)  # q2 alone would select differently


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"top_k": 3, "init_blocks": 2, "local_blocks": 2}, "top_k \\(the whole budget\\) must be >="),
    ],
)
def test_bad_options(opts, match):
    q, k, v = torch.randn(3, 1, 1, 16, 4)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "block_topk", causal=True, **opts)


def test_mask_needs_the_data():
    with pytest.raises(ValueError, match="depends on q and k"):
        attnlab.mask("block_topk", 8, 8)


def test_selection_is_a_keyword_not_an_option(capsys):
    """``selection=`` is an argument of the call, not an option: no default, not in ``attnlab list``."""
    from attnlab import cli

    assert "selection" not in attnlab.get("block_topk").defaults
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "block_topk" in listed and "selection" not in listed


def test_bad_selection_argument():
    q, k, v = torch.randn(3, 1, 2, 16, 4)
    opts = {"block_size": 4, "top_k": 2, "init_blocks": 1, "local_blocks": 1}
    with pytest.raises(ValueError, match="selection must be a BlockSelection"):
        attnlab.attention(q, k, v, "block_topk", causal=True, selection="x")
    short = select(q[:, :, :8], k[:, :, :8], causal=True, **opts)
    with pytest.raises(ValueError, match="selection must be a BlockSelection for T=16, S=16"):
        attnlab.attention(q, k, v, "block_topk", causal=True, selection=short)
    with pytest.raises(ValueError, match="selection must be a BlockSelection for T=16, S=16"):
        attnlab.get("block_topk").reference(q, k, v, causal=True, selection=short)
    sel = select(q, k, causal=True, **opts)
    # a mechanism that does not select refuses the argument, on every entry point
    refused = r"selection= is for mechanisms that select.*(dense|sliding_window) is a mask"
    for call in (
        lambda: attnlab.attention(q, k, v, "sliding_window", causal=True, window=4, selection=sel),
        lambda: attnlab.attention_lse(q, k, v, "dense", causal=True, selection=sel),
        lambda: attnlab.attention(q, k, v, "dense", causal=True, impl="reference", selection=sel),
        lambda: attnlab.get("dense").reference(q, k, v, causal=True, selection=sel),
    ):
        with pytest.raises(ValueError, match=refused):
            call()


def test_given_selection_runs_on_the_fast_path_and_the_oracle_alike():
    """Forward, LSE and gradients under a given selection match the dense oracle under the same one."""
    q, q2 = torch.randn(2, 2, 4, 37, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 37, 8, dtype=torch.float64)
    opts = {"block_size": 8, "top_k": 3, "init_blocks": 1, "local_blocks": 1}
    sel = select(q, k, causal=True, **opts)
    leaves = [x.clone().requires_grad_() for x in (q2, k, v)]
    got = attnlab.attention_lse(*leaves, "block_topk", causal=True, selection=sel, **opts)
    got.out.square().sum().backward()
    grads = [x.grad for x in leaves]
    ref_leaves = [x.clone().requires_grad_() for x in (q2, k, v)]
    want = attnlab.attention_lse(*ref_leaves, "block_topk", causal=True, impl="reference", selection=sel, **opts)
    want.out.square().sum().backward()
    torch.testing.assert_close(got.out, want.out)
    torch.testing.assert_close(got.lse, want.lse)
    for g, x in zip(grads, ref_leaves):
        torch.testing.assert_close(g, x.grad)
    oracle = attnlab.reference.attention(q2, k, v, sel.dense_mask().repeat_interleave(2, dim=1))
    torch.testing.assert_close(want.out, oracle.out)

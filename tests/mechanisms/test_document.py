"""Document (packed-sequence) masking: lengths and per-batch ids written out by loops, including
cross-attention offsets, the edge cases (one document, one-token documents), the executor against
the oracle, and bad options naming the option."""

import pytest
import torch

import attnlab


def _2d(m):
    """A mask with its leading singleton (batch, head) dims squeezed: [T, S] under either mask shape."""
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    return m


def same_document(T, ids, causal):
    """The definition for one row of ids [S]: query row i sits at key position p = i + S - T and sees
    the keys of p's document (at or before p when causal); rows with p < 0 see nothing."""
    S = len(ids)
    m = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = i + S - T
        for j in range(S):
            m[i, j] = p >= 0 and ids[p] == ids[j] and (j <= p or not causal)
    return m


def test_document_masks():
    m = _2d(attnlab.mask("document", 6, 6, causal=True, lengths=(2, 4)))
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:2, :2] = torch.ones(2, 2, dtype=torch.bool).tril()
    want[2:, 2:] = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(m, want)
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    m = attnlab.mask("document", 5, 5, document_ids=ids)
    assert m.shape == (2, 1, 5, 5) and torch.equal(m[1, 0, 3], torch.tensor([False, False, False, True, True]))
    torch.testing.assert_close(_2d(attnlab.mask("document", 5, 5, lengths=(2, 3))), m[0, 0])


def test_document_with_per_batch_ids_matches_oracle():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 2, 2, 2, 2]])
    q, k, v = torch.randn(3, 2, 2, 9, 4, dtype=torch.float64)
    for causal in (False, True):
        got = attnlab.attention(q, k, v, "document", causal=causal, document_ids=ids)
        want = attnlab.attention(q, k, v, "document", causal=causal, document_ids=ids, impl="reference")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("T", [9, 4, 13], ids=["self", "cross-short-q", "cross-long-q"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_is_the_document_rule_of_the_definition(T, causal):
    lengths = (2, 4, 1, 2)
    ids = [d for d, n in enumerate(lengths) for _ in range(n)]
    got = _2d(attnlab.mask("document", T, 9, causal=causal, lengths=lengths))
    assert torch.equal(got, same_document(T, ids, causal))
    # ids need not be sorted or contiguous: a document may come back later in the pack
    batch = torch.tensor([[3, 3, 7, 7, 3, 0, 0, 0, 7], [1, 1, 1, 1, 1, 1, 1, 1, 2]])
    got = attnlab.mask("document", T, 9, causal=causal, document_ids=batch)
    assert got.shape == (2, 1, T, 9)
    for b in range(2):
        assert torch.equal(got[b, 0], same_document(T, batch[b].tolist(), causal)), b


def test_one_document_is_dense_and_one_token_documents_are_the_diagonal():
    for causal in (False, True):
        whole = _2d(attnlab.mask("document", 5, 7, causal=causal, lengths=(7,)))
        assert torch.equal(whole, _2d(attnlab.mask("dense", 5, 7, causal=causal)))
        singles = _2d(attnlab.mask("document", 7, 7, causal=causal, lengths=(1,) * 7))
        assert torch.equal(singles, torch.eye(7, dtype=torch.bool))
    # a 1-D ids tensor is the lengths= mask of the same split
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.equal(
        _2d(attnlab.mask("document", 6, 6, document_ids=ids)), _2d(attnlab.mask("document", 6, 6, lengths=(2, 3, 1)))
    )


def test_executor_matches_the_oracle_forward_and_gradients_across_blocks():
    q = torch.randn(2, 4, 37, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for opts in ({"lengths": (5, 17, 1, 14)}, {"document_ids": torch.arange(37).div(6, rounding_mode="floor")}):
        with attnlab.kernels.block_size(8, 8):  # documents straddle block boundaries
            got = attnlab.attention(q, k, v, "document", causal=True, **opts)
        want = attnlab.attention(q, k, v, "document", causal=True, impl="reference", **opts)
        torch.testing.assert_close(got, want)
        up = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({}, "exactly one of lengths"),
        ({"lengths": (3, 4)}, "summing to the key length S=8"),
        ({"document_ids": torch.zeros(7, dtype=torch.long)}, "document_ids must be"),
        ({"document_ids": torch.zeros(8)}, "document_ids must be an integer tensor"),
        ({"lengths": (8,), "document_ids": torch.zeros(8, dtype=torch.long)}, "exactly one of lengths"),
        ({"lengths": (3, 0, 5)}, "lengths must be positive ints"),
        ({"lengths": (3, 2.5, 2.5)}, "lengths must be positive ints"),
        ({"document_ids": torch.zeros(8, dtype=torch.bool)}, "document_ids must be an integer tensor"),
        ({"document_ids": [0] * 8}, "document_ids must be an integer tensor"),
        ({"document_ids": torch.zeros(1, 1, 8, dtype=torch.long)}, "document_ids must be \\[S=8\\] or \\[B, S=8\\]"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "document", **opts)


def test_document_ids_batch_must_match():
    q, k, v = (torch.randn(3, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match="document_ids has batch 2 but q has batch 3"):
        attnlab.attention(q, k, v, "document", document_ids=torch.zeros(2, 8, dtype=torch.long))

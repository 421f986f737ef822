"""Region masks: group rules, the single-group and identity-rule equivalences, bad input."""

import pytest
import torch

import attnlab


def test_mask_follows_the_rule_table():
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    rules = torch.tensor([[True, True, True], [True, True, False], [False, False, True]])
    m = attnlab.mask("region", 6, 6, groups=groups, rules=rules)
    want = torch.tensor([[bool(rules[groups[i], groups[j]]) for j in range(6)] for i in range(6)])
    assert m.shape == (1, 1, 6, 6) and torch.equal(m[0, 0], want)
    c = attnlab.mask("region", 6, 6, causal=True, groups=groups, rules=rules)
    assert torch.equal(c[0, 0], want & torch.ones(6, 6, dtype=torch.bool).tril())


def test_defaults_are_one_group():
    q, k, v = torch.randn(3, 1, 2, 9, 4, dtype=torch.float64)
    torch.testing.assert_close(
        attnlab.attention(q, k, v, "region", causal=True), attnlab.attention(q, k, v, causal=True)
    )


def test_single_group_is_dense_and_identity_rules_are_documents():
    q = torch.randn(2, 4, 30, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 30, 8, dtype=torch.float64)
    one = torch.zeros(30, dtype=torch.long)
    for causal in (False, True):
        out = attnlab.attention(q, k, v, "region", causal=causal, groups=one)
        torch.testing.assert_close(out, attnlab.attention(q, k, v, causal=causal))
    docs = torch.tensor([0] * 7 + [1] * 13 + [2] * 10)
    a = attnlab.attention(q, k, v, "region", causal=True, groups=docs)
    b = attnlab.attention(q, k, v, "document", causal=True, lengths=(7, 13, 10))
    torch.testing.assert_close(a, b)


def test_scattered_regions_per_batch_match_oracle():
    torch.manual_seed(0)
    groups = torch.randint(0, 4, (2, 70))  # subjects' boxes scatter tokens across the sequence
    rules = torch.rand(4, 4) > 0.5
    rules[:, 0] = True
    q = torch.randn(2, 2, 70, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 1, 70, 8, dtype=torch.float64)
    with attnlab.kernels.block_size(16):
        for causal in (False, True):
            got = attnlab.attention(q, k, v, "region", causal=causal, groups=groups, rules=rules)
            ref = attnlab.attention(q, k, v, "region", causal=causal, groups=groups, rules=rules, impl="reference")
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"groups": [0] * 8}, "groups must be an integer tensor"),
        ({"groups": torch.zeros(5, dtype=torch.long)}, "groups must be \\[S=8\\]"),
        ({"groups": torch.zeros(8)}, "groups must be an integer tensor"),
        ({"groups": torch.arange(8), "rules": torch.eye(3, dtype=torch.bool)}, "groups uses ids up to 7"),
        ({"groups": torch.zeros(8, dtype=torch.long), "rules": torch.ones(2, 3, dtype=torch.bool)}, "square bool"),
    ],
)
def test_bad_options(opts, match):
    q, k, v = torch.randn(3, 1, 1, 8, 4)
    with pytest.raises(ValueError, match=match):
        attnlab.attention(q, k, v, "region", **opts)


def test_layout_is_cached_per_tensor_and_rebuilt_after_an_in_place_edit():
    groups = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2])
    rules = torch.ones(3, 3, dtype=torch.bool)
    mech = attnlab.get("region")
    a = mech.block_layout(8, 8, groups=groups, rules=rules)
    assert mech.block_layout(8, 8, groups=groups, rules=rules) is a
    groups[0] = 2
    assert mech.block_layout(8, 8, groups=groups, rules=rules) is not a

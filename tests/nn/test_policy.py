"""Layer policies: construction, SALA placement, JSON round trip, and errors."""

import pytest

from attnlab import Policy
from attnlab.policy import Layer, sparse_layers


def test_ratio_places_one_sparse_layer_in_four():
    p = Policy.ratio(8, ("sliding_window", {"window": 64}), "dense", every=4)
    assert [x.mechanism for x in p.layers] == ["dense"] * 3 + ["sliding_window"] + ["dense"] * 3 + ["sliding_window"]
    assert p[3].options == {"window": 64}


def test_sala_rule_reproduces_the_published_32_layer_mix():
    assert sorted(sparse_layers(32, 8, "sala")) == [0, 9, 16, 17, 22, 29, 30, 31]
    for n, c in ((8, 2), (12, 3), (24, 6), (5, 5)):
        picks = sparse_layers(n, c, "sala")
        assert len(picks) == c and all(0 <= i < n for i in picks)


def test_json_round_trip(tmp_path):
    p = Policy.ratio(6, ("strided_shard", {"block_size": 16, "vert_stride": 4}), "sliding_window", every=3, rule="sala")
    path = tmp_path / "policy.json"
    p.to_json(path)
    assert Policy.from_json(str(path)) == p
    assert Policy.from_json(p.to_json()) == p
    tupled = Policy.explicit([("neighborhood", {"shape": (4, 4), "kernel_size": (3, 3)})])
    assert Policy.from_json(tupled.to_json()) == tupled  # tuples are stored as lists on both sides


def test_bad_policies_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown mechanism"):
        Policy.explicit(["no_such_mechanism"])
    with pytest.raises(ValueError, match="unknown option"):
        Layer("sliding_window", {"size": 3})
    with pytest.raises(ValueError, match="at least one layer"):
        Policy.explicit([])
    with pytest.raises(ValueError, match="n_layers"):
        Policy.ratio(0)
    with pytest.raises(ValueError, match="rule"):
        Policy.ratio(4, "dense", "dense", rule="random")
    with pytest.raises(ValueError, match="JSON-serializable"):
        import torch

        Layer("region", {"groups": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="layers"):
        Policy.from_json('{"kind": "explicit"}')
    with pytest.raises(ValueError, match="2 layers but the model has 3"):
        Policy.explicit(["dense", "dense"]).check(3)

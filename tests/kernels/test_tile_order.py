"""Grid mechanisms run in tile order: the order is a permutation and results match the oracle."""

import pytest
import torch

import attnlab
from attnlab.kernels import block_size
from attnlab.kernels.order import TileOrder
from attnlab.testing import compare_to_reference


def test_tile_order_is_a_permutation_and_box_ranges_contain_the_box():
    tiles = TileOrder((10, 13), (4, 4))
    assert torch.equal(tiles.order.sort().values, torch.arange(130))
    assert torch.equal(tiles.order[tiles.inverse], torch.arange(130))
    pos = tiles.inverse.view(10, 13)  # tile-order position of each grid cell
    lo, hi = tiles.box_range([torch.tensor([2]), torch.tensor([3])], [torch.tensor([6]), torch.tensor([9])])
    box = pos[2:7, 3:10]
    assert lo.item() <= box.min().item() and box.max().item() < hi.item()


@pytest.mark.parametrize(
    ("name", "opts", "causal"),
    [
        ("neighborhood", {"shape": (12, 20), "kernel_size": (5, 3), "dilation": (2, 1)}, False),
        ("neighborhood", {"shape": (12, 20), "kernel_size": 4}, (True, False)),
        ("neighborhood", {"shape": (4, 6, 5), "kernel_size": (3, 3, 2), "dilation": (1, 2, 1)}, False),
        ("halo", {"shape": (16, 24), "block_size": 4, "halo": 2}, False),
        ("halo", {"shape": (16, 24), "block_size": 8, "halo": 1}, False),
    ],
)
@pytest.mark.parametrize("blocks", [(8, 8), (16, 32)])
def test_grids_in_tile_order_match_oracle(name, opts, causal, blocks):
    T = int(torch.tensor(opts["shape"]).prod())
    q = torch.randn(1, 4, T, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, T, 8, dtype=torch.float64)
    with block_size(*blocks):
        assert attnlab.get(name).block_layout(T, T, causal=causal, **opts).order is not None
        assert not compare_to_reference(name, q, k, v, causal=causal, **opts)

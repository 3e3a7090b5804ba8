"""`packed_grid` follows transformers' packing: split and assemble give the packed features back exactly."""

from __future__ import annotations

import pytest
import torch

from visor.flops import image_tokens
from visor.reduction.anyres import PackedGrid, packed_grid

SIZES = [(64, 64), (64, 128), (128, 64), (128, 128), (50, 120), (300, 90)]


@pytest.mark.parametrize("size", SIZES)
def test_grid_round_trip_equals_the_packed_features(stock, size):
    crops, visual = image_tokens(stock.config, size)
    with torch.no_grad():
        packed = stock.model.get_image_features(
            torch.randn(1, crops, 3, 64, 64), torch.tensor([size]), return_dict=True
        ).pooler_output[0]
    grid = packed_grid(stock.config, size)
    assert grid.num_tokens == visual == len(packed)
    base, hires = grid.split(packed)
    assert base.shape[:2] == grid.base and hires.shape[:2] == grid.hires
    assert torch.equal(PackedGrid.assemble(base, hires, stock.model.image_newline), packed)


def test_unpadding_shows_in_the_grid(stock):
    """An odd aspect ratio loses hi-res rows to unpadding; the base view is always the full crop grid."""
    assert packed_grid(stock.config, (128, 128)) == PackedGrid((8, 8), (16, 16))
    assert packed_grid(stock.config, (50, 120)) == PackedGrid((8, 8), (6, 16))

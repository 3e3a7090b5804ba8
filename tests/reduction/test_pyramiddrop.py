"""PyramidDrop: stage counts, off switch, FLOPs, errors."""

from __future__ import annotations

import pytest
import torch

from visor.reduction.pruned import kept_count
from visor.reduction.pyramiddrop import default_layers, pyramiddrop


def test_each_stage_keeps_ratio_of_what_is_left(stock, batch):
    model = pyramiddrop(stock, 0.5, [1, 3, 4])
    counts = model.visual_per_layer(batch)
    start = (batch["input_ids"] == stock.config.image_token_id).sum(dim=1)
    first = kept_count(start, 0.5)
    second = kept_count(first, 0.5)
    assert torch.equal(counts, torch.stack([start, first, first, second, kept_count(second, 0.5), kept_count(second, 0.5)], 1))


@torch.no_grad()
def test_ratio_one_is_the_stock_model(stock, batch):
    valid = batch["attention_mask"].bool()
    assert torch.equal(pyramiddrop(stock, 1.0)(**batch).logits[valid], stock(**batch).logits[valid])


def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree):
    flops_agree(pyramiddrop(stock, 0.5), prompt)


def test_default_stages():
    assert default_layers(32) == [8, 16, 24]
    assert default_layers(24) == [6, 12, 18]
    assert default_layers(6) == [1, 3, 4]


@pytest.mark.parametrize("options, message", [
    (dict(ratio=0.0), "ratio must be a fraction"),
    (dict(ratio=2.0), "ratio must be a fraction"),
    (dict(layers=[]), "distinct layers"),
    (dict(layers=[2, 2]), "distinct layers"),
    (dict(layers=[0, 3]), "stage boundary must be in"),
    (dict(layers=[3, 6]), "stage boundary must be in"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        pyramiddrop(stock, **options)

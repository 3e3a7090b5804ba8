"""HiRED: off switch, exact per-image budgets in mixed batches, the split across crops, FLOPs, errors."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.reduction import hired
from visor.reduction.hired import HiRED, _share

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@torch.no_grad()
def test_keep_everything_is_the_stock_model_exactly(stock, batch):
    assert torch.equal(hired(stock, 1.0)(**batch).logits, stock(**batch).logits)


@pytest.mark.parametrize("keep", [0.03, 0.2, 0.9])
def test_each_sample_keeps_its_budget(stock, batch, keep):
    reduced = hired(stock, keep)
    features = reduced.reducer.features(stock, batch["pixel_values"], batch["image_sizes"])
    assert [len(image) for image in features] == reduced.visual_tokens(batch).tolist()
    inputs = reduced.model_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    text = ((batch["input_ids"] != IMAGE) & batch["attention_mask"].bool()).sum(dim=1)
    assert torch.equal(inputs["attention_mask"].sum(dim=1), text + reduced.visual_tokens(batch))


def test_share_is_proportional_exact_and_capped():
    assert _share(10, torch.tensor([1.0, 1.0, 2.0, 0.0]), torch.tensor([100, 100, 100, 100])).tolist() == [3, 2, 5, 0]
    assert _share(10, torch.tensor([1.0, 1.0, 8.0]), torch.tensor([5, 5, 2])).tolist() == [4, 4, 2]


def test_budget_follows_the_base_view_over_each_crop(stock):
    """A base view whose attention sits on its left half sends the hi-res budget to the left crop."""
    early = torch.zeros(8, 8)
    early[:, :4] = 1.0
    budgets = HiRED(0.25, alpha=0.5)._budgets(stock.config, (64, 128), early.flatten(), torch.tensor([64, 64, 64]), 48)
    assert budgets.tolist() == [24, 24, 0]


def test_selected_tokens_are_the_top_scores_inside_each_crop(stock):
    config = stock.config
    size = (64, 128)  # base view + 1 × 2 crops, no unpadding: 64 + 8 × (16 + 1) tokens
    late = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    features = torch.arange(64 + 8 * 17, dtype=torch.float)[:, None]
    kept = HiRED(0.25).select(config, features, size, torch.ones(64), late)
    assert len(kept) == 48 + 8  # the budget, and the 8 hi-res rows' newlines
    assert kept[:24, 0].tolist() == sorted(late[0].topk(24).indices.tolist())
    newlines = [64 + 17 * row + 16 for row in range(8)]
    assert set(newlines) <= set(kept[24:, 0].tolist())


def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree):
    flops_agree(hired(stock, 0.3), prompt)


def test_generation(stock, batch, generate_options):
    sequences = hired(stock, 0.2).generate(**batch, **generate_options).sequences
    assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)


def test_bad_input(stock):
    with pytest.raises(ValueError, match="keep must be a fraction in"):
        hired(stock, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        hired(stock, 0.5, alpha=1.5)

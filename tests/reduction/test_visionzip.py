"""VisionZip (and VISOR + VisionZip): off switch, budgets per sample, dominant choice, merging, FLOPs, errors."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.reduction import visionzip
from visor.reduction.vision_attention import captured_queries_keys, received_attention
from visor.reduction.visionzip import VisionZip

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@torch.no_grad()
def test_keep_everything_is_the_model_exactly(stock, visor, batch):
    assert torch.equal(visionzip(stock, 1.0)(**batch).logits, stock(**batch).logits)
    assert torch.equal(visionzip(visor, 1.0)(**batch).logits, visor(**batch).logits)


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.8])
def test_each_sample_keeps_its_budget(visor, batch, keep):
    reduced = visionzip(visor, keep)
    inputs = reduced.model_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    counts = [len(image) for image in inputs["image_features"]]
    assert counts == reduced.visual_tokens(batch).tolist()
    assert torch.equal((inputs["input_ids"] == IMAGE).sum(dim=1), torch.tensor(counts))
    full = (batch["input_ids"] == IMAGE).sum(dim=1)
    assert all(count < total for count, total in zip(counts, full.tolist()))


def test_budget_split():
    assert VisionZip(1 / 6).budget(384) == (54, 10)  # the reference's 54 dominant + 10 contextual
    assert VisionZip(0.01).budget(50) == (1, 0)


@torch.no_grad()
def test_received_attention_is_the_eager_attention_mean(stock, batch):
    """The hooks' scores equal what an eager vision tower returns as attention weights (mean over heads, queries)."""
    pixel_values, sizes = batch["pixel_values"][:1, :3], batch["image_sizes"][:1]
    with captured_queries_keys(stock, [0, 1]) as captured:
        stock.model.get_image_features(pixel_values, sizes, return_dict=True)
    weights = stock.model.vision_tower(pixel_values[0], output_attentions=True).attentions
    for layer in (0, 1):
        torch.testing.assert_close(received_attention(stock, layer, *captured[layer]), weights[layer].mean(dim=(1, 2)),
                                   atol=1e-6, rtol=0)


def test_dominant_tokens_are_the_top_scores_and_contextual_merge_the_rest():
    features = torch.arange(10.0)[:, None].repeat(1, 2)
    scores = torch.tensor([0.0, 9, 1, 8, 2, 3, 4, 5, 6, 7])
    keys = torch.tensor([[1.0, 0]] * 5 + [[0, 1.0]] * 5)
    grid = torch.ones(10, dtype=torch.bool)
    zipped = VisionZip(0.5).zip_image(features, scores, keys, grid)  # 5 kept: 4 dominant + 1 contextual
    assert zipped[:4, 0].tolist() == [1, 3, 8, 9]
    # The rest (0, 2, 4, 5, 6, 7): one target (0); every other token joins it; target + mean(members).
    assert zipped[4, 0] == 0 + (2 + 4 + 5 + 6 + 7) / 5


def test_newline_tokens_stay_in_place_outside_the_budget():
    features = torch.arange(10.0)[:, None]
    scores = torch.tensor([0.0, 9, 1, 8, 2, 3, 4, 5, 6, 7])
    grid = torch.ones(10, dtype=torch.bool)
    grid[[2, 6]] = False  # two newline tokens, with the lowest scores of their neighbourhoods
    zipped = VisionZip(0.5).zip_image(features, scores, torch.ones(10, 2), grid)  # of 8 grid tokens: 3 + 1
    assert zipped[:5, 0].tolist() == [1, 2, 3, 6, 9]
    assert len(zipped) == 5 + 1


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_flops_agree_with_the_flop_counter(stock, visor, prompt, flops_agree, keep):
    for model in (visionzip(stock, keep), visionzip(visor, keep)):
        flops_agree(model, prompt)


def test_generation(stock, batch, generate_options):
    sequences = visionzip(stock, 0.2).generate(**batch, **generate_options).sequences
    assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.01])
def test_bad_keep(stock, keep):
    with pytest.raises(ValueError, match="keep must be a fraction in"):
        visionzip(stock, keep)

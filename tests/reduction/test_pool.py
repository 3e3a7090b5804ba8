"""Token pooling before the LLM, alone and under VISOR: off switch, counts, FLOPs, generation, errors; the same
for video frames (VideoPooling)."""

from __future__ import annotations

import pytest
import torch

from visor import VisorForConditionalGeneration, presets
from visor.reduction import pool, pool_video
from visor.backbones.llava_onevision import PackedGrid
from visor.reduction.pool import Pooling, VideoPooling

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@torch.no_grad()
def test_stride_one_is_the_stock_model_exactly(stock, batch):
    assert torch.equal(pool(stock, 1)(**batch).logits, stock(**batch).logits)


@torch.no_grad()
def test_stride_one_is_visor_exactly(visor, batch):
    assert torch.equal(pool(visor, 1)(**batch).logits, visor(**batch).logits)


def test_pooled_grid_shapes():
    grid = torch.arange(8 * 6, dtype=torch.float)[:, None].reshape(8, 6, 1)
    pooled = Pooling(2)._pool_grid(grid)
    assert pooled.shape == (4, 3, 1)
    assert pooled[0, 0, 0] == grid[:2, :2].mean()
    assert Pooling(4)._pool_grid(grid).shape == (2, 2, 1)  # ceil(6 / 4) = 2
    newline = torch.full((1,), -1.0)
    assert len(PackedGrid.assemble(pooled, pooled, newline)) == 12 + 4 * 4


@pytest.mark.parametrize("stride", [1.5, 2, 4])
def test_each_sample_keeps_its_own_count(stock, batch, stride):
    """Mixed image sizes in one batch: the reduced prompt holds exactly the counted tokens of each sample."""
    reduced = pool(stock, stride)
    inputs = reduced.model_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    expected = torch.tensor([reduced.reducer.kept_tokens(stock.config, tuple(size)) for size in batch["image_sizes"].tolist()])
    assert torch.equal(reduced.visual_tokens(batch), expected)
    assert (expected < (batch["input_ids"] == IMAGE).sum(dim=1)).all()
    # The stock path gets embeddings: count the rebuilt prompt's image slots through the kept mask's length.
    text = ((batch["input_ids"] != IMAGE) & batch["attention_mask"].bool()).sum(dim=1)
    assert torch.equal(inputs["attention_mask"].sum(dim=1), text + expected)
    visor_inputs = pool(VisorForConditionalGeneration.from_stock(stock), stride).model_inputs(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    assert torch.equal((visor_inputs["input_ids"] == IMAGE).sum(dim=1), expected)
    assert [len(image) for image in visor_inputs["image_features"]] == expected.tolist()


@pytest.mark.parametrize("stride", [1, 2])
def test_flops_agree_with_the_flop_counter(stock, visor, prompt, flops_agree, stride):
    for model in (pool(stock, stride), pool(visor, stride)):
        flops_agree(model, prompt)


def test_generation_keeps_the_prompt_and_matches_stock_when_off(stock, visor, batch, generate_options):
    expected = stock.generate(**batch, **generate_options).sequences
    assert torch.equal(pool(stock, 1).generate(**batch, **generate_options).sequences, expected)
    for model in (pool(stock, 2), pool(visor, 2)):
        sequences = model.generate(**batch, **generate_options).sequences
        assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)
        assert torch.equal(sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_bad_input(stock, batch):
    with pytest.raises(ValueError, match="stride must be >= 1"):
        pool(stock, 0.5)
    with pytest.raises(ValueError, match="configuration needs a VISOR"):
        pool(stock, 2, configuration=0)
    wrong = dict(batch, image_sizes=batch["image_sizes"].flip(0))
    with pytest.raises(ValueError, match="match its size"):
        pool(stock, 2)(**wrong)


# ---- video frames ----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_video_pooling_pools_every_frame_of_the_stock_features(stock, videos, stride):
    """Each frame's 4x4 pooled grid (the stock 2x2 pooling of 8x8 patches) pooled again, the newline kept last."""
    batch, _ = videos
    pixels = batch["pixel_values_videos"]
    reducer = VideoPooling(stride)
    frames = pixels.shape[1]
    stock_features = stock.model.get_video_features(pixels, return_dict=True).pooler_output
    for video, full in zip(reducer.video_features(stock, pixels), stock_features, strict=True):
        assert len(video) == reducer.kept_tokens(stock.config, frames) == frames * Pooling(stride).pooled(4) ** 2 + 1
        grids = full[:-1].reshape(frames, 4, 4, -1)
        expected = torch.cat([Pooling(stride)._pool_grid(grid).flatten(0, 1) for grid in grids] + [full[-1:]])
        assert torch.equal(video, expected)


@torch.no_grad()
def test_video_pooling_entry_point(stock, videos):
    batch, _ = videos
    assert torch.equal(pool_video(stock, 1)(**batch).logits, stock(**batch).logits)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        pool_video(stock, 0.5)

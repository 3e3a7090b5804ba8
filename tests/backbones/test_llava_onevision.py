"""The LLaVA-OneVision adapter answers as transformers' own code does: token counts, the packed grids, the parts."""

from __future__ import annotations

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration, presets
from visor.backbones import backbone_for, family
from visor.backbones.llava_onevision import LlavaOnevision, PackedGrid

SIZES = [(64, 64), (64, 128), (128, 64), (128, 128), (50, 120), (300, 90)]


@pytest.fixture(scope="module")
def stock(stock_factory):
    return stock_factory("tiny", num_layers=2)


@pytest.mark.parametrize("size", SIZES)
def test_grid_round_trip_equals_the_packed_features(stock, size):
    backbone = backbone_for(stock.config)
    crops, visual = backbone.image_tokens(size)
    with torch.no_grad():
        packed = backbone.encode_images(stock, visual, pixel_values=torch.randn(1, crops, 3, 64, 64),
                                        image_sizes=torch.tensor([size]))[0]
    grid = backbone.packed_grid(size)
    assert grid.num_tokens == visual == len(packed)
    base, hires = grid.split(packed)
    assert base.shape[:2] == grid.base and hires.shape[:2] == grid.hires
    assert torch.equal(PackedGrid.assemble(base, hires, backbone.newline(stock)), packed)
    assert int(grid.newlines().sum()) == grid.hires[0] and bool(grid.newlines()[-1])


def test_unpadding_shows_in_the_grid(stock):
    """An odd aspect ratio loses hi-res rows to unpadding; the base view is always the full crop grid."""
    backbone = backbone_for(stock.config)
    assert backbone.packed_grid((128, 128)) == PackedGrid((8, 8), (16, 16))
    assert backbone.packed_grid((50, 120)) == PackedGrid((8, 8), (6, 16))
    assert backbone.crop_grid((64, 128)) == (1, 2) and backbone.crops((64, 128)) == 3


def test_a_nominal_image_in_pixels_is_the_vision_work_counted(stock):
    """What `visor bench --end-to-end` times: ceil(N / tokens per crop) crops through the stock vision path."""
    from torch.utils.flop_counter import FlopCounterMode

    from visor.flops import nominal_vision_flops

    backbone = backbone_for(stock.config)
    per_crop = backbone.tokens_per_crop()
    for tokens in (2 * per_crop, 3 * per_crop - 5, 5 * per_crop):
        pixels = backbone.nominal_pixel_inputs(tokens)
        assert pixels["pixel_values"].shape[1] == backbone.crops(tuple(pixels["image_sizes"][0].tolist()))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            backbone.encode_images(stock, tokens, **pixels)
        assert counter.get_total_flops() == nominal_vision_flops(stock.config, tokens).total
        with torch.no_grad():
            packed = backbone.encode_images(stock, tokens, **pixels)
        assert [image.shape[0] for image in packed] == [backbone.nominal_visual_tokens(tokens)]
    with pytest.raises(ValueError, match="no image runs exactly 1 crops .* anyres images run 2, 3, 5 crops"):
        backbone.nominal_pixel_inputs(per_crop)


def test_stock_and_visor_configs_find_the_family_and_its_classes(stock):
    visor_config = VisorConfig.from_stock_config(stock.config)
    for config in (stock.config, visor_config):
        assert isinstance(backbone_for(config), LlavaOnevision)
        module = family(config)
        assert module.VISOR_MODEL is VisorForConditionalGeneration and module.BACKBONE is LlavaOnevision
    assert backbone_for(stock.config).language_model(stock) is stock.model.language_model
    assert backbone_for(stock.config).vision_layers(stock) is stock.model.vision_tower.encoder.layers
    assert backbone_for(stock.config).largest_image_size() == (128, 128)


def test_an_unknown_family_is_named(stock):
    with pytest.raises(ValueError, match="no VISOR backbone for model type 'qwen2'"):
        backbone_for(presets.tiny(2).text_config)


def test_image_inputs_the_family_does_not_read_are_refused(stock):
    backbone = backbone_for(stock.config)
    assert set(backbone.select_image_inputs(pixel_values=None)) == {"pixel_values", "image_sizes", "batch_num_images",
                                                                    "pixel_values_videos"}
    with pytest.raises(ValueError, match="take no image_grid_thw"):
        backbone.select_image_inputs(image_grid_thw=torch.ones(1, 3))

"""InternVL3 (InternViT vision tower over 448-pixel tiles, pixel shuffle, an MLP projector, a Qwen2 text model): the
adapter, and the family's `VisorInternVLConfig` (model type `visor_internvl`) and
`VisorInternVLForConditionalGeneration`.

The adapter answers from transformers' own code: tiles go through the stock `get_image_features` (the CLS token
dropped, the patch grid pixel-shuffled by `downsample_ratio`, projected), tile counts come from the stock image
processor's `get_optimal_tiled_canvas`, positions are the stock model's (one per token, as LLaVA-OV's). An image is
its tiles in the processor's order, the row-major grid then a thumbnail (none for a one-tile image), each tile a
row-major grid of `tokens_per_tile` tokens, between `<img>` and `</img>` text tokens the processor writes.

The stock inputs do not say which tiles belong to which image (the processor drops its `num_patches`), so
`encode_images` returns one tensor per *tile*: the CPE runs within each tile, and a tile's tokens are contiguous in
the prompt, so every mask ("a text token reads the visual tokens before it") is the same as per image.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_all_supported_aspect_ratios,
    get_optimal_tiled_canvas,
)

from visor.backbones.base import (
    Backbone, ImageTokens, linear_flops, selected_layer, sequential_positions, vit_layer_flops,
)
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


@strict
class VisorInternVLConfig(VisorConfigMixin, InternVLConfig):
    """An InternVL config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor_internvl"


AutoConfig.register("visor_internvl", VisorInternVLConfig)


# ImageNet's normalisation, as InternVL3's released preprocessor configs use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVL(Backbone):
    stock_model_class = InternVLForConditionalGeneration
    image_inputs = ()
    image_processor_class = GotOcr2ImageProcessorPil
    # The stock image processor's tile bounds (its defaults, which InternVL3's releases keep): 1 to 12 tiles.
    min_tiles = GotOcr2ImageProcessorPil.min_patches
    max_tiles = GotOcr2ImageProcessorPil.max_patches

    def __init__(self, config):
        super().__init__(config)
        if config.vision_feature_select_strategy != "default":
            raise ValueError("InternVL's features drop the vision tower's CLS token "
                             "(vision_feature_select_strategy='default'); "
                             f"got {config.vision_feature_select_strategy!r}")

    # ---- the language model ------------------------------------------------------------------------------------
    def language_model(self, model):
        return model.model.language_model

    def prompt_positions(self, model, input_ids, attention_mask, **image_inputs):
        return sequential_positions(input_ids)

    # ---- images -------------------------------------------------------------------------------------------------
    def encode_images(self, model, num_image_tokens, pixel_values=None):
        """One (tokens_per_tile, d) tensor per tile, in prompt order (see the module docstring)."""
        if pixel_values is None:
            raise ValueError(f"input_ids contain {num_image_tokens} image tokens but pixel_values are missing")
        side = self.tile_side
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, side, side):
            raise ValueError(f"pixel_values must be (tiles, 3, {side}, {side}), got {tuple(pixel_values.shape)}")
        return list(model.model.get_image_features(pixel_values, return_dict=True).pooler_output)

    def default_image_processor(self):
        """ImageNet's mean and std, tiles of the vision tower's size, the stock 1 to 12 tiles (and a thumbnail)."""
        tile = {"height": self.tile_side, "width": self.tile_side}
        return self.image_processor_class(size=tile, crop_to_patches=True, min_patches=self.min_tiles,
                                          max_patches=self.max_tiles, image_mean=list(IMAGENET_MEAN),
                                          image_std=list(IMAGENET_STD))

    @property
    def tile_side(self) -> int:
        height, width = self.config.vision_config.image_size
        if height != width:
            raise ValueError(f"InternVL tiles are square; the vision config's image_size is {(height, width)}")
        return height

    def patch_grid(self) -> int:
        """Patches per side of one tile."""
        return self.tile_side // self.config.vision_config.patch_size[0]

    def tokens_per_tile(self) -> int:
        """Projected tokens per tile: the patch grid after the pixel shuffle (`downsample_ratio` per side)."""
        return round(self.patch_grid() * self.config.downsample_ratio) ** 2

    def tiles(self, image_size) -> int:
        """Tiles of one (height, width) image, as the stock processor cuts it: its tile grid, plus a thumbnail
        when the grid has more than one tile."""
        height, width = image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive (height, width), got {image_size}")
        columns, rows = get_optimal_tiled_canvas((height, width), (self.tile_side, self.tile_side),
                                                 self.min_tiles, self.max_tiles)
        return 1 if columns * rows == 1 else columns * rows + 1

    def image_tokens(self, image_size, alone: bool = True) -> ImageTokens:
        """Every image is tiled, alone in its prompt or not."""
        tiles = self.tiles(image_size)
        return ImageTokens(tiles, tiles * self.tokens_per_tile())

    def largest_image_size(self) -> tuple[int, int]:
        return self.largest_image_within(self.min_tiles, self.max_tiles)

    def largest_image_within(self, min_tiles: int, max_tiles: int) -> tuple[int, int]:
        """The (height, width) of an image cut into the most tiles these bounds allow, in the squarest such grid:
        rows × columns whole tiles (the stock processor picks that grid for it, an exact aspect-ratio match)."""
        columns, rows = max(get_all_supported_aspect_ratios(min_tiles, max_tiles),
                            key=lambda grid: (grid[0] * grid[1], -abs(grid[0] - grid[1])))
        return rows * self.tile_side, columns * self.tile_side

    # ---- the vision side's cost ---------------------------------------------------------------------------------
    def vision_flops(self, image_size):
        return self.tile_flops(self.tiles(image_size))

    def nominal_vision_flops(self, visual_tokens):
        """ceil(N / tokens per tile) tiles: the fewest that hold N tokens."""
        return self.tile_flops(self._nominal_tiles(visual_tokens))

    def nominal_image_inputs(self, visual_tokens):
        return {}  # positions are 0 … S-1 whatever the image

    def nominal_pixel_inputs(self, visual_tokens):
        """ceil(N / tokens per tile) tiles of random pixels; a ValueError when no image is cut into that many."""
        tiles = self._nominal_tiles(visual_tokens)
        possible = [1, *range(max(self.min_tiles, 2) + 1, self.max_tiles + 2)]
        if tiles not in possible:
            raise ValueError(
                f"no image is cut into exactly {tiles} tiles ({visual_tokens} visual tokens at "
                f"{self.tokens_per_tile()} per tile); images are cut into 1 or {possible[1]} to {possible[-1]} tiles "
                "(a grid and its thumbnail)")
        side = self.tile_side
        return {"pixel_values": torch.randn(tiles, 3, side, side, generator=torch.Generator().manual_seed(0))}

    def nominal_visual_tokens(self, visual_tokens):
        """Whole tiles: N rounded up to a multiple of the tokens per tile."""
        return self._nominal_tiles(visual_tokens) * self.tokens_per_tile()

    def _nominal_tiles(self, visual_tokens: int) -> int:
        return math.ceil(visual_tokens / self.tokens_per_tile())

    def tile_flops(self, tiles: int) -> dict[str, int]:
        """InternViT (patch conv, every layer's q/k/v/projection over the patches and the CLS token, attention,
        fc1/fc2) and the projector (after the pixel shuffle) over `tiles` tiles."""
        config, vision = self.config, self.config.vision_config
        patches = self.patch_grid() ** 2
        tokens, width = patches + 1, vision.hidden_size
        patch_embedding = 2 * patches * width * vision.num_channels * vision.patch_size[0] * vision.patch_size[1]
        per_layer = vit_layer_flops(tokens, width, vision.intermediate_size)  # projection_layer is the o
        projected, text_width = self.tokens_per_tile(), config.text_config.hidden_size
        projector = (linear_flops(projected, width * patches // projected, text_width)
                     + linear_flops(projected, text_width, text_width))
        return {"vision_tower": tiles * (patch_embedding + vision.num_hidden_layers * per_layer),
                "projector": tiles * projector}

    # ---- the vision tower ---------------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.vision_tower

    def vision_layers(self, model):
        return self.vision_tower(model).encoder.layer

    def feature_layer(self) -> int:
        return selected_layer(self.config.vision_feature_layer, self.config.vision_config.num_hidden_layers)


class VisorInternVLForConditionalGeneration(VisorModel, InternVLForConditionalGeneration):
    """InternVL with VISOR's layer kinds (`visor.modeling.visor.VisorModel`)."""

    config_class = VisorInternVLConfig
    backbone_class = InternVL


BACKBONE, VISOR_MODEL = InternVL, VisorInternVLForConditionalGeneration

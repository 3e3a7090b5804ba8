"""LLaVA-OneVision (SigLIP vision tower, 2-layer MLP projector, anyres packing with `image_newline`): the adapter,
and the family's `VisorConfig` (model type `visor`) and `VisorForConditionalGeneration`.

The adapter answers from transformers' own code: images go through the stock `get_image_features` and videos
through the stock `get_video_features` (each frame a base-view crop, its patch grid pooled 2x2 by `apply_pooling`,
one `image_newline` after the video's last frame); token counts come from running the stock `pack_image_features`
and `apply_pooling` on marker features, positions are the stock model's.
`PackedGrid` says where one image's packed tokens sit: [base view grid (h × w, row-major)] + [hi-res grid (H × W),
the anyres crops stitched, unpadded and possibly down-sized, with an `image_newline` token after every row].
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from visor.backbones.base import (
    Backbone, ImageTokens, linear_flops, selected_layer, sequential_positions, vit_layer_flops,
)
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


@strict
class VisorConfig(VisorConfigMixin, LlavaOnevisionConfig):
    """A LLaVA-OneVision config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor"


AutoConfig.register("visor", VisorConfig)


@dataclass(frozen=True)
class PackedGrid:
    base: tuple[int, int]  # (h, w) of the base view
    hires: tuple[int, int]  # (H, W) of the stitched crops, without the newline column

    @property
    def num_tokens(self) -> int:
        return self.base[0] * self.base[1] + self.hires[0] * (self.hires[1] + 1)

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, ...) packed tokens → base (h, w, ...) and hi-res (H, W, ...) grids (newlines dropped)."""
        h, w = self.base
        rows, cols = self.hires
        base = features[: h * w].reshape(h, w, *features.shape[1:])
        return base, features[h * w:].reshape(rows, cols + 1, *features.shape[1:])[:, :cols]

    def newlines(self) -> torch.Tensor:
        """(n,) bool: which packed tokens are `image_newline` (the end of each hi-res row)."""
        h, w = self.base
        rows, cols = self.hires
        hires = torch.zeros(rows, cols + 1, dtype=torch.bool)
        hires[:, cols] = True
        return torch.cat([torch.zeros(h * w, dtype=torch.bool), hires.flatten()])

    @staticmethod
    def assemble(base: torch.Tensor, hires: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """Inverse of `split` for any grid sizes: base tokens, then hi-res rows each closed by `newline`."""
        base = base.flatten(0, 1)
        rows = torch.cat([hires, newline.to(hires).expand(hires.shape[0], 1, -1)], dim=1)
        return torch.cat([base, rows.flatten(0, 1)])


# SigLIP's normalisation, as LLaVA-OneVision's released preprocessor configs use.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class LlavaOnevision(Backbone):
    stock_model_class = LlavaOnevisionForConditionalGeneration
    image_inputs = ("image_sizes", "batch_num_images")
    video_inputs = ("pixel_values_videos",)
    video_processor_name = "LlavaOnevisionVideoProcessor"
    default_video_frames = 32  # LLaVA-OneVision's video setting: 32 frames of ceil(27 / 2)² = 196 tokens
    image_processor_class = LlavaOnevisionImageProcessorPil

    # ---- the language model ------------------------------------------------------------------------------------
    def language_model(self, model):
        return model.model.language_model

    def prompt_positions(self, model, input_ids, attention_mask, **image_inputs):
        return sequential_positions(input_ids)

    # ---- images -------------------------------------------------------------------------------------------------
    def encode_images(self, model, num_image_tokens, pixel_values=None, image_sizes=None, batch_num_images=None):
        if pixel_values is None or image_sizes is None:
            raise ValueError(
                f"input_ids contain {num_image_tokens} image tokens but pixel_values/image_sizes are missing"
            )
        if pixel_values.dim() not in (4, 5) or pixel_values.shape[-3] != 3:
            raise ValueError(
                f"pixel_values must be (batch, crops, 3, H, W) or (crops, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        if image_sizes.dim() != 2 or image_sizes.shape[-1] != 2:
            raise ValueError(f"image_sizes must be (num_images, 2) as (height, width), got {tuple(image_sizes.shape)}")
        return model.model.get_image_features(
            pixel_values, image_sizes, batch_num_images=batch_num_images, return_dict=True
        ).pooler_output

    def encode_videos(self, model, num_video_tokens, pixel_values_videos=None):
        if pixel_values_videos is None:
            raise ValueError(f"input_ids contain {num_video_tokens} video tokens but pixel_values_videos are missing")
        side = self.config.vision_config.image_size
        if pixel_values_videos.dim() != 5 or tuple(pixel_values_videos.shape[2:]) != (3, side, side):
            raise ValueError(f"pixel_values_videos must be (videos, frames, 3, {side}, {side}), got "
                             f"{tuple(pixel_values_videos.shape)}")
        self.frame_tokens()  # refuses a patch grid the stock pooling cannot take, before the vision tower runs
        return list(model.model.get_video_features(pixel_values_videos, return_dict=True).pooler_output)

    def frame_tokens(self) -> int:
        """Visual tokens of one video frame: its projected patch grid after the stock 2x2 `apply_pooling`."""
        if self.config.vision_feature_select_strategy != "full":
            raise ValueError("LLaVA-OneVision video needs vision_feature_select_strategy='full' (the stock pooling "
                             "reshapes the whole patch grid of each frame)")
        pooler = types.SimpleNamespace(config=self.config)  # apply_pooling reads nothing but self.config
        return LlavaOnevisionModel.apply_pooling(pooler, torch.zeros(1, self.tokens_per_crop(), 1)).shape[1]

    def video_tokens(self, frames: int) -> ImageTokens:
        """Crops (one per frame) and visual tokens of a video of `frames` frames: every frame's pooled tokens, then
        one `image_newline`."""
        if frames <= 0:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        return ImageTokens(frames, frames * self.frame_tokens() + 1)

    def default_image_processor(self):
        """SigLIP's mean and std 0.5, crops of the vision tower's size, the config's anyres grid pinpoints."""
        crop = {"height": self.config.vision_config.image_size, "width": self.config.vision_config.image_size}
        return self.image_processor_class(size=crop, crop_size=crop, image_mean=list(SIGLIP_MEAN),
                                          image_std=list(SIGLIP_STD),
                                          image_grid_pinpoints=[list(p) for p in self.config.image_grid_pinpoints])

    def crops(self, image_size, alone: bool = True) -> int:
        """Crops of one (height, width) image through the vision tower: the anyres grid plus the base view (the
        base view alone for an image that shares its prompt with others)."""
        if not alone:
            return 1
        return image_size_to_num_patches(list(image_size), self.config.image_grid_pinpoints,
                                         self.config.vision_config.image_size)

    def largest_image_size(self) -> tuple[int, int]:
        """The largest anyres canvas (height, width): the image size with the most visual tokens."""
        return tuple(max(self.config.image_grid_pinpoints, key=lambda pinpoint: pinpoint[0] * pinpoint[1]))

    def crop_grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of the anyres crops of one (height, width) image (the base view excluded)."""
        return get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                           self.config.vision_config.image_size)

    def tokens_per_crop(self) -> int:
        """Projected tokens per crop: the patch grid, minus the first token under the "default" strategy."""
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches - 1 if self.config.vision_feature_select_strategy == "default" else patches

    def pack_like(self, per_crop: torch.Tensor, image_size) -> torch.Tensor:
        """Per-crop patch values (crops, patches, C) of one image packed as its visual tokens are: (n, C).

        So that anything computed per crop patch (attention received, keys …) lines up with the packed tokens;
        newline slots hold zeros, and unpadded or down-sized grids follow transformers' own code.
        """
        packer = types.SimpleNamespace(config=self.config)  # pack_image_features reads nothing but self.config
        (packed,), _ = LlavaOnevisionModel.pack_image_features(
            packer, [per_crop], torch.tensor([list(image_size)]), per_crop.new_zeros(per_crop.shape[-1]),
            self.config.vision_aspect_ratio,
        )
        return packed

    def image_tokens(self, image_size, alone: bool = True) -> ImageTokens:
        height, width = image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive (height, width), got {image_size}")
        crops = self.crops((height, width), alone)
        return ImageTokens(crops, self.pack_like(torch.zeros(crops, self.tokens_per_crop(), 1), (height, width)).shape[0])

    def packed_grid(self, image_size) -> PackedGrid:
        """The grids of one (height, width) image's packed tokens."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        if side * side != self.tokens_per_crop():
            raise ValueError("pre-LLM reduction needs the full patch grid per crop (vision_feature_select_strategy='full')")
        packed = self.pack_like(torch.ones(self.crops(image_size), side * side, 1), image_size)
        newlines = (packed[side * side:, 0] == 0).nonzero().squeeze(1)
        return PackedGrid((side, side), (len(newlines), int(newlines[0])))

    def newline(self, model) -> torch.Tensor:
        return model.model.image_newline

    def vision_flops(self, image_size):
        """SigLIP and the projector over every crop of the image (see `crop_flops`)."""
        return self.crop_flops(self.crops(image_size))

    def video_vision_flops(self, frames):
        """SigLIP and the projector over every frame, each a crop (`crop_flops`); the pooling after the projector
        is an interpolation, not counted."""
        return self.crop_flops(frames)

    def nominal_vision_flops(self, visual_tokens):
        """ceil(N / tokens per crop) crops: the fewest crops that hold N tokens before anyres packing."""
        return self.crop_flops(math.ceil(visual_tokens / self.tokens_per_crop()))

    def nominal_image_inputs(self, visual_tokens):
        return {}  # positions are 0 … S-1 whatever the image

    def nominal_pixel_inputs(self, visual_tokens):
        """ceil(N / tokens per crop) crops of random pixels, with an image size whose anyres grid makes exactly that
        many crops (a grid pinpoint)."""
        crops = math.ceil(visual_tokens / self.tokens_per_crop())
        sizes = [tuple(pinpoint) for pinpoint in self.config.image_grid_pinpoints if self.crops(pinpoint) == crops]
        if not sizes:
            possible = sorted({self.crops(pinpoint) for pinpoint in self.config.image_grid_pinpoints})
            raise ValueError(
                f"no image runs exactly {crops} crops ({visual_tokens} visual tokens at {self.tokens_per_crop()} per "
                f"crop) through this model's vision tower; anyres images run {', '.join(map(str, possible))} crops")
        side = self.config.vision_config.image_size
        pixels = torch.randn(1, crops, 3, side, side, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels, "image_sizes": torch.tensor([sizes[0]])}

    def nominal_video_inputs(self, frames):
        return {}  # positions are 0 … S-1 whatever the video

    def nominal_video_pixel_inputs(self, frames):
        """`frames` frames of random pixels, each one crop of the vision tower's size (the stock video path)."""
        self.video_tokens(frames)  # refuses no frame, or a patch grid the stock pooling cannot take
        side = self.config.vision_config.image_size
        pixels = torch.randn(1, frames, 3, side, side, generator=torch.Generator().manual_seed(0))
        return {"pixel_values_videos": pixels}

    def nominal_visual_tokens(self, visual_tokens):
        """The packed tokens (unpadded, with newlines) of the pinpoint image `nominal_pixel_inputs` makes."""
        image_size = self.nominal_pixel_inputs(visual_tokens)["image_sizes"][0].tolist()
        return self.image_tokens(image_size).visual_tokens

    def crop_flops(self, crops: int) -> dict[str, int]:
        """SigLIP (patch conv, every layer's q/k/v/o, attention, fc1/fc2) and the projector over `crops` crops; the
        projector runs on every crop patch before the unpadding, so the cost depends on crops, not tokens."""
        config, vision = self.config, self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        width = vision.hidden_size
        patch_embedding = 2 * patches * width * vision.num_channels * vision.patch_size**2
        per_layer = vit_layer_flops(patches, width, vision.intermediate_size)
        feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        text_width, tokens = config.text_config.hidden_size, self.tokens_per_crop()
        projector = (linear_flops(tokens, width * feature_layers, text_width)
                     + linear_flops(tokens, text_width, text_width))
        return {"vision_tower": crops * (patch_embedding + vision.num_hidden_layers * per_layer),
                "projector": crops * projector}

    # ---- the vision tower ---------------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.vision_tower

    def vision_layers(self, model):
        return self.vision_tower(model).encoder.layers

    def feature_layer(self) -> int:
        return selected_layer(self.config.vision_feature_layer, self.config.vision_config.num_hidden_layers)


class VisorForConditionalGeneration(VisorModel, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with VISOR's layer kinds (`visor.modeling.visor.VisorModel`)."""

    config_class = VisorConfig
    backbone_class = LlavaOnevision


BACKBONE, VISOR_MODEL = LlavaOnevision, VisorForConditionalGeneration

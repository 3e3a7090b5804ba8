"""Qwen2-VL (a ViT over variable-size patch grids, a 2×2 patch merger, M-RoPE): the adapter, and the family's
`VisorQwen2VLConfig` (model type `visor_qwen2_vl`) and `VisorQwen2VLForConditionalGeneration`.

The adapter answers from transformers' own code: images go through the stock `get_image_features`, positions
come from the stock `get_rope_index` over the whole prompt (3 rows: time, height, width; an image advances the
text position by its grid's longer side, not by its token count), token counts from the stock processor's
`smart_resize`. An image is one grid of (h/merge) × (w/merge) tokens in row-major order, with no separator
tokens inside it. Qwen2.5-VL (`visor.backbones.qwen2_5_vl`) shares all of it but the classes; Qwen3-VL
(`visor.backbones.qwen3_vl`) adds DeepStack. The two read video, and share a nominal video's geometry (`QwenVideo`).
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from visor.backbones.base import Backbone, ImageTokens, linear_flops
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


class QwenVL(Backbone):
    """What the Qwen-VL families share; a subclass names the stock class."""

    image_inputs = ("image_grid_thw", "mm_token_type_ids")
    image_processor_class = Qwen2VLImageProcessorPil
    # The stock image processor's pixel bounds (its defaults): how large an image becomes before patching.
    min_pixels = Qwen2VLImageProcessorPil.size["shortest_edge"]
    max_pixels = Qwen2VLImageProcessorPil.size["longest_edge"]
    # Its normalisation (CLIP's), as Qwen2-VL's and Qwen2.5-VL's released preprocessor configs use.
    image_mean = Qwen2VLImageProcessorPil.image_mean
    image_std = Qwen2VLImageProcessorPil.image_std

    # ---- the language model ------------------------------------------------------------------------------------
    def language_model(self, model):
        return model.model.language_model

    def prompt_positions(self, model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                         mm_token_type_ids=None, pixel_values_videos=None, video_grid_thw=None,
                         second_per_grid_ts=None):
        """M-RoPE positions (3, B, S) from the stock `get_rope_index`, padding excluded; with no image or video,
        one position per token as the stock model then takes. `mm_token_type_ids` (1 at image tokens, 2 at video
        tokens) is derived from `input_ids` when not given. Only the grids (and a video's seconds per temporal
        patch) are read: the images may come as precomputed features."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_image = input_ids == self.config.image_token_id
        is_video = self.visual_token_mask(input_ids) & ~is_image
        if not ((is_image | is_video) & valid).any():
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
        if (is_image & valid).any():
            self._check_grids(int((is_image & valid).sum()), image_grid_thw)
            self._check_runs(is_image & valid, image_grid_thw, "image")
        videos = {}
        if (is_video & valid).any():
            self._check_video_grids(int((is_video & valid).sum()), video_grid_thw, second_per_grid_ts)
            self._check_runs(is_video & valid, self.video_runs(video_grid_thw), "video")
            videos = dict(video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
        if mm_token_type_ids is None:
            mm_token_type_ids = is_image.int() + 2 * is_video.int()
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                  attention_mask=attention_mask, **videos)
        return positions

    def caller_positions(self, position_ids):
        """`generate` passes (4, B, S): a text row (for packed sequences), then the three M-RoPE rows."""
        return position_ids[1:] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids

    # ---- images -------------------------------------------------------------------------------------------------
    def default_image_processor(self):
        """The family's normalisation, transformers' default pixel bounds, the vision config's patch sizes."""
        vision = self.config.vision_config
        return self.image_processor_class(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            image_mean=list(self.image_mean), image_std=list(self.image_std))

    def encode_images(self, model, num_image_tokens, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None):
        self._check_images(num_image_tokens, pixel_values, image_grid_thw)
        return self.features(model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True))

    def encode_videos(self, model, num_video_tokens, pixel_values_videos=None, video_grid_thw=None,
                      second_per_grid_ts=None):
        """The stock `get_video_features`: each video's (t/temporal patch) × (h/merge) × (w/merge) tokens."""
        if pixel_values_videos is None:
            raise ValueError(f"input_ids contain {num_video_tokens} video tokens but pixel_values_videos are missing")
        self._check_video_grids(num_video_tokens, video_grid_thw, second_per_grid_ts)
        self._check_patches("pixel_values_videos", pixel_values_videos, video_grid_thw)
        return self.features(model.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True))

    def features(self, output) -> list[torch.Tensor]:
        """What the adapter hands on of the stock image or video features: one (n, d) tensor per image (video)."""
        return list(output.pooler_output)

    def video_runs(self, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """The grids of a prompt's unbroken runs of video tokens, in order: one run per video."""
        return video_grid_thw

    def _check_images(self, num_image_tokens, pixel_values, image_grid_thw) -> None:
        if pixel_values is None:
            raise ValueError(f"input_ids contain {num_image_tokens} image tokens but pixel_values are missing")
        self._check_grids(num_image_tokens, image_grid_thw)
        self._check_patches("pixel_values", pixel_values, image_grid_thw)

    def _check_patches(self, name, pixels, grid_thw) -> None:
        patches = int(grid_thw.prod(dim=-1).sum())
        if pixels.dim() != 2 or pixels.shape[0] != patches:
            raise ValueError(f"{name} must be (patches, features) with {patches} patches for the grids "
                             f"{grid_thw.tolist()}, got {tuple(pixels.shape)}")

    def _check_grids(self, num_image_tokens, image_grid_thw) -> None:
        if image_grid_thw is None:
            raise ValueError(f"input_ids contain {num_image_tokens} image tokens but image_grid_thw is missing")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
            raise ValueError(f"image_grid_thw must be (num_images, 3) as (t, h, w), got {tuple(image_grid_thw.shape)}")
        if bool((image_grid_thw[:, 0] != 1).any()):
            where = ("videos go in pixel_values_videos with video_grid_thw" if self.video_inputs
                     else "video input is not supported")
            raise ValueError(f"images have one temporal patch (t = 1); got t = {image_grid_thw[:, 0].tolist()}: "
                             f"{where}")

    def _check_video_grids(self, num_video_tokens, video_grid_thw, second_per_grid_ts) -> None:
        if video_grid_thw is None:
            raise ValueError(f"input_ids contain {num_video_tokens} video tokens but video_grid_thw is missing")
        if video_grid_thw.dim() != 2 or video_grid_thw.shape[-1] != 3:
            raise ValueError(f"video_grid_thw must be (num_videos, 3) as (t, h, w), got {tuple(video_grid_thw.shape)}")
        if second_per_grid_ts is not None and len(second_per_grid_ts) != len(video_grid_thw):
            raise ValueError(f"second_per_grid_ts must hold one value per video ({len(video_grid_thw)}), got "
                             f"{len(second_per_grid_ts)}")

    def _check_runs(self, slots, grid_thw, kind: str) -> None:
        """Each unbroken run of image (video) tokens is one image (video), in order (as the stock `get_rope_index`
        reads them): its length must be its grid's token count."""
        expected = (grid_thw.prod(dim=-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        found = []
        for row in slots.int():
            edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
            starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
            found += (ends - starts).tolist()
        if found != expected:
            raise ValueError(f"{kind}-token count does not match the {kind}s: the prompts hold runs of {found} {kind} "
                             f"tokens, {kind}_grid_thw gives {expected}")

    @property
    def merged_patch(self) -> int:
        """Pixels per side of one visual token: a patch times the merger's size."""
        return self.config.vision_config.patch_size * self.config.vision_config.spatial_merge_size

    def resized(self, image_size) -> tuple[int, int]:
        """The (height, width) the stock processor resizes an image to: multiples of the merged patch, within its
        default pixel bounds."""
        height, width = image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive (height, width), got {image_size}")
        return smart_resize(height, width, self.merged_patch, self.min_pixels, self.max_pixels)

    def image_tokens(self, image_size, alone: bool = True) -> ImageTokens:
        height, width = self.resized(image_size)
        return ImageTokens(1, (height // self.merged_patch) * (width // self.merged_patch))

    def largest_image_size(self) -> tuple[int, int]:
        """The largest square the processor keeps whole: its pixel bound, rounded down to the merged patch."""
        side = int(self.max_pixels**0.5) // self.merged_patch * self.merged_patch
        return side, side

    # ---- the vision side's cost ---------------------------------------------------------------------------------
    def vision_flops(self, image_size):
        patch = self.config.vision_config.patch_size
        height, width = self.resized(image_size)
        return self.grid_flops(height // patch, width // patch)

    def nominal_vision_flops(self, visual_tokens):
        return self.grid_flops(*self._nominal_patches(visual_tokens))

    def nominal_image_inputs(self, visual_tokens):
        return {"image_grid_thw": torch.tensor([[1, *self._nominal_patches(visual_tokens)]])}

    def nominal_pixel_inputs(self, visual_tokens):
        """Random patches of the `nominal_grid` image (one temporal patch)."""
        grid = self.nominal_image_inputs(visual_tokens)["image_grid_thw"]
        return {"pixel_values": self.random_patches(grid), "image_grid_thw": grid}

    def random_patches(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Random pixels of one (t, h, w) grid in the processor's flattened layout: (t·h·w, channels × temporal
        patch × patch²)."""
        vision = self.config.vision_config
        features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return torch.randn(int(grid_thw.prod()), features, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def nominal_grid(visual_tokens: int) -> tuple[int, int]:
        """rows × columns merged tokens, exactly N of them, as square as N's divisors allow (rows ≤ columns)."""
        rows = next(rows for rows in range(math.isqrt(visual_tokens), 0, -1) if visual_tokens % rows == 0)
        return rows, visual_tokens // rows

    def _nominal_patches(self, visual_tokens: int) -> tuple[int, int]:
        """The patch grid (rows, columns) of `nominal_grid`."""
        merge = self.config.vision_config.spatial_merge_size
        return tuple(side * merge for side in self.nominal_grid(visual_tokens))

    def grid_flops(self, rows: int, columns: int) -> dict[str, int]:
        """The vision tower over one image of rows × columns patches (patch conv over the temporal pair, every
        block's qkv/proj, attention within each block's groups, MLP) and the patch merger(s)."""
        vision = self.config.vision_config
        width, merge = self.vision_width(), vision.spatial_merge_size
        patches = rows * columns
        patch_pixels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        patch_embedding = linear_flops(patches, patch_pixels, width)
        per_block = 4 * linear_flops(patches, width, width) + self.vision_mlp_flops(patches)
        attention = sum(2 * 2 * width * sum(group**2 for group in self.attention_groups(block, rows, columns))
                        for block in range(vision.depth))
        merged, merged_width = patches // merge**2, width * merge**2
        merger = (linear_flops(merged, merged_width, merged_width)
                  + linear_flops(merged, merged_width, self.projected_width()))
        return {"vision_tower": patch_embedding + vision.depth * per_block + attention,
                "projector": self.mergers() * merger}

    # What the families' vision towers differ in (Qwen2.5-VL's and Qwen3-VL's names; `Qwen2VL` has its own).
    def vision_width(self) -> int:
        return self.config.vision_config.hidden_size

    def projected_width(self) -> int:
        return self.config.vision_config.out_hidden_size

    def vision_mlp_flops(self, patches: int) -> int:
        vision = self.config.vision_config
        return 2 * linear_flops(patches, vision.hidden_size, vision.intermediate_size)  # fc1, fc2

    def attention_groups(self, block: int, rows: int, columns: int) -> list[int]:
        """Patches per attention group of `block` on one image: the whole image."""
        return [rows * columns]

    def mergers(self) -> int:
        return 1

    # ---- the vision tower ---------------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.visual

    def vision_layers(self, model):
        return self.vision_tower(model).blocks


class QwenVideo(QwenVL):
    """What the Qwen-VL families that read video share (Qwen2.5-VL, Qwen3-VL): a nominal video's geometry and cost,
    from the family's frame-resize rule (`resized_frames`) at its stock video processor's bounds on a frame's
    pixels (`min_frame_pixels` … `max_frame_pixels`). A video runs through the tower one temporal patch at a time."""

    min_frame_pixels: int
    max_frame_pixels: int

    def resized_frames(self, frames: int, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """The (height, width) the stock video processor resizes the frames of a `frames`-frame video to."""
        raise NotImplementedError

    def largest_frame_size(self, frames: int) -> tuple[int, int]:
        """The nominal frame (height, width) of a video of `frames` frames: the largest square of whole merged
        patches that the stock video processor keeps whole at its default bounds (as `largest_image_size` is for
        images)."""
        merged = self.merged_patch
        side = math.isqrt(self.max_frame_pixels) // merged * merged
        while side > merged and self.resized_frames(frames, side, side, self.min_frame_pixels,
                                                    self.max_frame_pixels) != (side, side):
            side -= merged
        return side, side

    def video_grid(self, frames: int) -> tuple[int, int, int]:
        """(t, h, w) patches of a video of `frames` nominal frames: the frames in whole temporal patches (the stock
        processor repeats the last frame to fill the final one), each `largest_frame_size` in patches."""
        if frames <= 0:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        vision = self.config.vision_config
        height, width = (side // vision.patch_size for side in self.largest_frame_size(frames))
        return math.ceil(frames / vision.temporal_patch_size), height, width

    def video_tokens(self, frames):
        """Temporal patches (each runs through the vision tower as one image grid) and merged tokens:
        t × (h / merge) × (w / merge)."""
        temporal, height, width = self.video_grid(frames)
        return ImageTokens(temporal, temporal * height * width // self.config.vision_config.spatial_merge_size**2)

    def video_vision_flops(self, frames):
        """t times one frame grid's `grid_flops`: the stock tower attends within each temporal patch alone."""
        temporal, height, width = self.video_grid(frames)
        return {part: temporal * flops for part, flops in self.grid_flops(height, width).items()}

    def nominal_video_inputs(self, frames):
        return {"video_grid_thw": torch.tensor([self.video_grid(frames)])}

    def nominal_video_pixel_inputs(self, frames):
        inputs = self.nominal_video_inputs(frames)
        return {"pixel_values_videos": self.random_patches(inputs["video_grid_thw"]), **inputs}


@strict
class VisorQwen2VLConfig(VisorConfigMixin, Qwen2VLConfig):
    """A Qwen2-VL config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor_qwen2_vl"


AutoConfig.register("visor_qwen2_vl", VisorQwen2VLConfig)


class Qwen2VL(QwenVL):
    stock_model_class = Qwen2VLForConditionalGeneration

    def vision_width(self) -> int:
        return self.config.vision_config.embed_dim

    def projected_width(self) -> int:
        return self.config.vision_config.hidden_size

    def vision_mlp_flops(self, patches: int) -> int:
        vision = self.config.vision_config
        return 2 * linear_flops(patches, vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio))  # fc1, fc2


class VisorQwen2VLForConditionalGeneration(VisorModel, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with VISOR's layer kinds (`visor.modeling.visor.VisorModel`)."""

    config_class = VisorQwen2VLConfig
    backbone_class = Qwen2VL


BACKBONE, VISOR_MODEL = Qwen2VL, VisorQwen2VLForConditionalGeneration

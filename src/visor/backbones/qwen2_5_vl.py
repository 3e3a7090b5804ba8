"""Qwen2.5-VL: Qwen2-VL's adapter (`visor.backbones.qwen2_vl.QwenVL`: positions, image tokens, the vision tower)
on the Qwen2.5-VL classes (windowed attention and a SwiGLU MLP in the vision tower; the same M-RoPE, merger and
token layout), with video (the stock video features and temporal positions; a nominal video's tokens and FLOPs
at the stock video processor's largest frame, `visor.backbones.qwen2_vl.QwenVideo`; the processor side is
`visor.data.processor.GridVideos`), and the family's `VisorQwen2_5_VLConfig` (model type `visor_qwen2_5_vl`) and
`VisorQwen2_5_VLForConditionalGeneration`.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.video_utils import VideoMetadata

from visor.backbones.base import linear_flops
from visor.backbones.qwen2_vl import QwenVideo
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


@strict
class VisorQwen2_5_VLConfig(VisorConfigMixin, Qwen2_5_VLConfig):
    """A Qwen2.5-VL config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor_qwen2_5_vl"


AutoConfig.register("visor_qwen2_5_vl", VisorQwen2_5_VLConfig)


class Qwen2_5_VL(QwenVideo):
    stock_model_class = Qwen2_5_VLForConditionalGeneration
    # Video through the stock `get_video_features`, its temporal M-RoPE positions through the stock `get_rope_index`.
    video_inputs = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    # The stock video processor, whose settings `visor.data.processor` reads, and its bounds on a frame's pixels,
    # size["shortest_edge"] and size["longest_edge"] (its module needs torchvision, so the defaults are restated).
    video_processor_name = "Qwen2VLVideoProcessor"
    min_frame_pixels = 128 * 28 * 28
    max_frame_pixels = 28 * 28 * 768

    # ---- video geometry -----------------------------------------------------------------------------------------
    def resized_frames(self, frames: int, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """Each frame alone within the pixel bounds, in whole merged patches (Qwen's `smart_resize`, as for an
        image), whatever `frames` is."""
        return smart_resize(height, width, self.merged_patch, min_pixels, max_pixels)

    def seconds_per_temporal_patch(self, frames: int) -> float:
        """What the stock processor writes as a video's `second_per_grid_ts` when its `frames` frames come without
        timing (a list of frames, as Pillow reads them): temporal_patch_size / the sampled fps of metadata without
        one, transformers' default rate of 24 frames a second."""
        return self.config.vision_config.temporal_patch_size / VideoMetadata(total_num_frames=frames).sampled_fps

    def nominal_video_inputs(self, frames):
        """The grid, and seconds per temporal patch as the stock processor computes them for untimed frames."""
        return {**super().nominal_video_inputs(frames),
                "second_per_grid_ts": torch.tensor([self.seconds_per_temporal_patch(frames)])}

    def vision_mlp_flops(self, patches: int) -> int:
        vision = self.config.vision_config
        return 3 * linear_flops(patches, vision.hidden_size, vision.intermediate_size)  # SwiGLU

    def attention_groups(self, block: int, rows: int, columns: int) -> list[int]:
        """The whole image in the full-attention blocks; elsewhere square windows of `window_size` pixels (in
        whole merged patches, cut short at the image's right and bottom edges)."""
        vision = self.config.vision_config
        if block in vision.fullatt_block_indexes:
            return [rows * columns]
        merge = vision.spatial_merge_size
        window = vision.window_size // merge // vision.patch_size

        def extents(merged: int) -> list[int]:
            return [window] * (merged // window) + ([merged % window] if merged % window else [])

        return [height * width * merge**2 for height in extents(rows // merge) for width in extents(columns // merge)]


class VisorQwen2_5_VLForConditionalGeneration(VisorModel, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with VISOR's layer kinds (`visor.modeling.visor.VisorModel`)."""

    config_class = VisorQwen2_5_VLConfig
    backbone_class = Qwen2_5_VL


BACKBONE, VISOR_MODEL = Qwen2_5_VL, VisorQwen2_5_VLForConditionalGeneration

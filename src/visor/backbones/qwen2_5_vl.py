"""Qwen2.5-VL: Qwen2-VL's adapter (`visor.backbones.qwen2_vl.QwenVL`: positions, image tokens, the vision tower)
on the Qwen2.5-VL classes (windowed attention and a SwiGLU MLP in the vision tower; the same M-RoPE, merger and
token layout), with video (the stock video features and temporal positions), and the family's
`VisorQwen2_5_VLConfig` (model type `visor_qwen2_5_vl`) and `VisorQwen2_5_VLForConditionalGeneration`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from visor.backbones.base import linear_flops
from visor.backbones.qwen2_vl import QwenVL
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


@strict
class VisorQwen2_5_VLConfig(VisorConfigMixin, Qwen2_5_VLConfig):
    """A Qwen2.5-VL config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor_qwen2_5_vl"


AutoConfig.register("visor_qwen2_5_vl", VisorQwen2_5_VLConfig)


class Qwen2_5_VL(QwenVL):
    stock_model_class = Qwen2_5_VLForConditionalGeneration
    # Video through the stock `get_video_features`, its temporal M-RoPE positions through the stock `get_rope_index`.
    video_inputs = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

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

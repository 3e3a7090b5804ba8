"""Qwen3-VL: Qwen2-VL's adapter (`visor.backbones.qwen2_vl.QwenVL`) on the Qwen3-VL classes, plus DeepStack, and the
family's `VisorQwen3VLConfig` (model type `visor_qwen3_vl`) and `VisorQwen3VLForConditionalGeneration`.

What differs from Qwen2.5-VL is inside stock modules VISOR calls as they are (the text model's q/k norms, the
interleaved M-RoPE, the vision tower's learned positions), except DeepStack and the video layout. DeepStack: the
vision tower also hands out features of a few of its layers, which the stock model adds to the image and video
tokens' hidden states after the first LLM layers. `encode_images` and `encode_videos` return them stacked under
each image's (video's) features, and the engine adds them to the visual tokens after those layers
(`visor.modeling.visor.embed_with_images`). Video: the processor writes each temporal patch of a video as its own
run of video tokens, after its timestamp text ("<t seconds>") and between vision start and end tokens, and the
stock `get_rope_index` places each run as a one-frame image (the time is in the text, not in the positions); there
is no `second_per_grid_ts`. The processor side is `visor.data.processor.TimedGridVideos` (frames sampled and
resized as the stock video processor does, `resized_frames`); a nominal video's tokens and FLOPs, at the stock
video processor's bounds, are `visor.backbones.qwen2_vl.QwenVideo`'s. The MoE variant (`qwen3_vl_moe`) is not
supported.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_smart_resize

from visor.backbones.qwen2_vl import QwenVideo
from visor.config import VisorConfigMixin
from visor.modeling.visor import VisorModel


@strict
class VisorQwen3VLConfig(VisorConfigMixin, Qwen3VLConfig):
    """A Qwen3-VL config with VISOR's layer schedule (`visor.config.VisorConfigMixin`)."""

    model_type = "visor_qwen3_vl"


AutoConfig.register("visor_qwen3_vl", VisorQwen3VLConfig)


class Qwen3VL(QwenVideo):
    stock_model_class = Qwen3VLForConditionalGeneration
    image_mean = image_std = (0.5, 0.5, 0.5)  # as Qwen3-VL's released preprocessor configs normalise
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    # The stock video processor, whose settings `visor.data.processor` reads (its module imports without
    # torchvision; its resizing needs it), and its bounds on the pixels of all a video's frames together.
    video_processor_name = "Qwen3VLVideoProcessor"
    min_frame_pixels = Qwen3VLVideoProcessor.size["shortest_edge"]
    max_frame_pixels = Qwen3VLVideoProcessor.size["longest_edge"]

    def mergers(self) -> int:
        """The output merger and one per DeepStack layer."""
        return 1 + len(self.config.vision_config.deepstack_visual_indexes)

    def features(self, output) -> list[torch.Tensor]:
        """Per image (video) (1 + K, n, d): its features, then DeepStack's additions after LLM layers 0 … K-1."""
        return [torch.stack([item, *additions])
                for item, *additions in zip(output.pooler_output, *output.deepstack_features)]

    # ---- video geometry -----------------------------------------------------------------------------------------
    def resized_frames(self, frames: int, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """Whole merged patches, the pixel bounds holding all the frames in whole temporal patches (the stock 3-D
        `smart_resize`), which needs a temporal patch of frames. The nominal video's frames shrink as it grows."""
        temporal = self.config.vision_config.temporal_patch_size
        if frames < temporal:
            raise ValueError(f"a {type(self).__name__} video needs at least {temporal} frames (one temporal patch: "
                             f"the stock video processor resizes no shorter video), got {frames}")
        return video_smart_resize(frames, height, width, temporal, self.merged_patch, min_pixels, max_pixels)

    def video_layout(self, frames: int) -> list[int]:
        """One run per temporal patch, each (h / merge) × (w / merge) tokens: its timestamp stands between."""
        temporal, height, width = self.video_grid(frames)
        return [height * width // self.config.vision_config.spatial_merge_size**2] * temporal

    def video_runs(self, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """One run per temporal patch of each video (the timestamps stand between), as the stock `get_rope_index`
        splits the grids: (1, h, w) each."""
        runs = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0)
        return torch.cat([torch.ones_like(runs[:, :1]), runs[:, 1:]], dim=1)


class VisorQwen3VLForConditionalGeneration(VisorModel, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with VISOR's layer kinds (`visor.modeling.visor.VisorModel`)."""

    config_class = VisorQwen3VLConfig
    backbone_class = Qwen3VL


BACKBONE, VISOR_MODEL = Qwen3VL, VisorQwen3VLForConditionalGeneration

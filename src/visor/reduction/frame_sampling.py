"""Uniform frame subsampling: the usual fix for long videos, as a baseline on the same FLOP counter.

A video of F frames keeps ceil(F / `stride`) of them, spread uniformly by transformers' `default_sample_indices_fn`
(`visor.data.frames.sampled_frame_indices`, as the stock processors sample): when the stride is an integer k
that divides F, exactly every k-th frame from the first. Only the kept frames go through the vision tower, so the
vision side and the LLM prefill both shrink; the kept frames are then the stock video path's (each a pooled SigLIP
crop, one `image_newline` after the last). Stride 1 keeps every frame: the model it wraps, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from visor.backbones import backbone_for
from visor.data.frames import sampled_frame_indices
from visor.reduction.prellm_video import VideoReduced


@dataclass(frozen=True)
class FrameSampling:
    stride: float

    def __post_init__(self):
        if not self.stride >= 1:
            raise ValueError(f"frame stride must be >= 1 (1 = every frame), got {self.stride}")

    def kept_frames(self, frames: int) -> list[int]:
        """The indices of the frames a video of `frames` frames keeps."""
        return sampled_frame_indices(frames, math.ceil(round(frames / self.stride, 9)))

    def kept_tokens(self, config, frames: int) -> int:
        return backbone_for(config).video_tokens(len(self.kept_frames(frames))).visual_tokens

    def vision_flops(self, config, frames: int) -> int:
        return sum(backbone_for(config).video_vision_flops(len(self.kept_frames(frames))).values())

    def video_features(self, model, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        kept = self.kept_frames(pixel_values_videos.shape[1])
        return backbone_for(model.config).encode_videos(model, 0, pixel_values_videos=pixel_values_videos[:, kept])


def subsample_frames(model, stride: float = 2.0, configuration: int | None = None) -> VideoReduced:
    """`model` (a stock model or VISOR at `configuration`, default its largest) reading every `stride`-th frame."""
    return VideoReduced(model, FrameSampling(stride), configuration)

"""2-D average pooling of the visual tokens before the LLM ("token pooling"; VISOR-TR when under VISOR).

Each image's base-view grid and stitched hi-res grid (the backbone's `packed_grid`) are average-pooled down to
ceil(side / `stride`) cells per side (adaptive pooling: windows of about `stride` × `stride` tokens spread evenly
over the grid, so any real stride ≥ 1 works); the hi-res rows get their `image_newline` again. Stride 2 keeps
about a quarter of the tokens, as LLaVA-OV's own 2×2 video pooling; stride 1 is the identity.

`VideoPooling` pools each video frame's grid the same way, on top of the stock 2×2 pooling (LLaVA-OV's frame
of 27 × 27 patches is 14 × 14 tokens; stride 2 makes it 7 × 7), and keeps the video's one `image_newline` after
the last frame; stride 1 is the stock video path.

Reference vs paper: the VISOR paper reports "2x / 4x token pooling" on LLaVA-OV without code. We pool on the
packed (unpadded, stitched) grids, so a window may straddle two crops; pooling each 27×27 crop before
packing would differ only at crop borders and at unpadded edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional

from visor.backbones import backbone_for
from visor.reduction.prellm import PreLLMReduced
from visor.reduction.prellm_video import VideoReduced


@dataclass(frozen=True)
class Pooling:
    stride: float

    def __post_init__(self):
        if not self.stride >= 1:
            raise ValueError(f"pooling stride must be >= 1 (1 = no pooling), got {self.stride}")

    def pooled(self, side: int) -> int:
        return math.ceil(round(side / self.stride, 9))

    def kept_tokens(self, config, image_size) -> int:
        grid = backbone_for(config).packed_grid(image_size)
        (h, w), (rows, cols) = grid.base, grid.hires
        return self.pooled(h) * self.pooled(w) + self.pooled(rows) * (self.pooled(cols) + 1)

    def vision_overhead_flops(self, config, image_size) -> int:
        return 0  # averaging is element-wise, ignored like norms (`visor.flops`)

    def features(self, model, pixel_values, image_sizes) -> list[torch.Tensor]:
        backbone = backbone_for(model.config)
        packed = backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes)
        return [self.pool_image(image, backbone.packed_grid(size), backbone.newline(model))
                for image, size in zip(packed, image_sizes.tolist())]

    def pool_image(self, features: torch.Tensor, grid, newline: torch.Tensor) -> torch.Tensor:
        base, hires = grid.split(features)
        return grid.assemble(self._pool_grid(base), self._pool_grid(hires), newline)

    def _pool_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(..., h, w, d) → (..., ceil(h / stride), ceil(w / stride), d) by average pooling."""
        size = (self.pooled(grid.shape[-3]), self.pooled(grid.shape[-2]))
        return functional.adaptive_avg_pool2d(grid.movedim(-1, -3), size).movedim(-3, -1)


@dataclass(frozen=True)
class VideoPooling:
    stride: float

    def __post_init__(self):
        Pooling(self.stride)  # the stride's check

    def kept_tokens(self, config, frames: int) -> int:
        side = Pooling(self.stride).pooled(_frame_side(config))
        return frames * side * side + 1

    def vision_flops(self, config, frames: int) -> int:
        return sum(backbone_for(config).video_vision_flops(frames).values())  # the pooling itself is element-wise

    def video_features(self, model, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        frames, side = pixel_values_videos.shape[1], _frame_side(model.config)
        videos = backbone_for(model.config).encode_videos(model, 0, pixel_values_videos=pixel_values_videos)
        return [torch.cat([Pooling(self.stride)._pool_grid(video[:-1].reshape(frames, side, side, -1)).flatten(0, 2),
                           video[-1:]]) for video in videos]


def _frame_side(config) -> int:
    """Tokens per side of one video frame's (square) pooled grid."""
    return math.isqrt(backbone_for(config).frame_tokens())


def pool(model, stride: float = 2.0, configuration: int | None = None) -> PreLLMReduced:
    """`model` (a stock model or VISOR at `configuration`, default its largest) reading pooled visual tokens."""
    return PreLLMReduced(model, Pooling(stride), configuration)


def pool_video(model, stride: float = 2.0, configuration: int | None = None) -> VideoReduced:
    """`model` (a stock model or VISOR at `configuration`, default its largest) reading pooled video frames."""
    return VideoReduced(model, VideoPooling(stride), configuration)

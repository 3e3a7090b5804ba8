"""EVS-style temporal pruning (Efficient Video Sampling; vLLM's `--video-pruning-rate` for Qwen-VL): drop the video
tokens that repeat the previous frame.

After the projector and the stock 2x2 pooling, every token of frame t > 1 is scored by its cosine similarity to the
token at the same grid position in frame t - 1; of a video's F × T grid tokens, max(T, floor(F·T·(1 - `rate`)))
are kept: the whole first frame, then the later frames' least similar tokens (ties to the earlier token), all in
their original order, and the video's `image_newline` after them. The count depends only on the frame count, so
the prompt is cut before the video is encoded; which tokens stay depends on the content. The similarities are
element-wise (a dot product per token), ignored by the counter as norms are. Rate 0 keeps every token: the model
it wraps, exactly.

Reference vs this module: vLLM (and SGLang, adapted from it) compute the same retention rule on Qwen-VL's merged
patch grid, the first frame forced in by a large dissimilarity, and rebuild the M-RoPE positions of the kept tokens;
LLaVA-OV's positions are sequential, so the shorter prompt gets contiguous positions here, as every pre-LLM
reduction's does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from visor.backbones import backbone_for
from visor.reduction.prellm_video import VideoReduced


@dataclass(frozen=True)
class EVS:
    rate: float  # fraction of a video's grid tokens pruned, in [0, 1)

    def __post_init__(self):
        if not 0 <= self.rate < 1:
            raise ValueError(f"video pruning rate must be in [0, 1) (0 = no pruning), got {self.rate}")

    def kept_grid_tokens(self, frame_tokens: int, frames: int) -> int:
        """Grid tokens (newline excluded) a video keeps: at least its first frame."""
        return max(frame_tokens, int(round(frames * frame_tokens * (1 - self.rate), 9)))

    def kept_tokens(self, config, frames: int) -> int:
        return self.kept_grid_tokens(backbone_for(config).frame_tokens(), frames) + 1

    def vision_flops(self, config, frames: int) -> int:
        return sum(backbone_for(config).video_vision_flops(frames).values())

    def video_features(self, model, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        backbone = backbone_for(model.config)
        frames = pixel_values_videos.shape[1]
        videos = backbone.encode_videos(model, 0, pixel_values_videos=pixel_values_videos)
        return [self.prune_video(video, frames) for video in videos]

    def prune_video(self, video: torch.Tensor, frames: int) -> torch.Tensor:
        """(F·T + 1, d) tokens of one video (F frames of T tokens, then the newline) → the kept ones, in order."""
        grid = video[:-1].reshape(frames, -1, video.shape[-1])
        frame_tokens = grid.shape[1]
        similarity = functional.cosine_similarity(grid[1:], grid[:-1], dim=-1)  # (F - 1, T)
        later = self.kept_grid_tokens(frame_tokens, frames) - frame_tokens
        kept = torch.zeros(frames, frame_tokens, dtype=torch.bool, device=video.device)
        kept[0] = True
        kept[1:].view(-1)[similarity.flatten().argsort(stable=True)[:later]] = True
        return torch.cat([grid[kept], video[-1:]])


def evs(model, rate: float = 0.5, configuration: int | None = None) -> VideoReduced:
    """`model` (a stock model or VISOR at `configuration`, default its largest) reading videos pruned by EVS."""
    return VideoReduced(model, EVS(rate), configuration)

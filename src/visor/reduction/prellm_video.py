"""Methods that reduce a video's tokens before the language model (frame subsampling, EVS, video pooling).

A `VideoReducer` turns each video's pixels into fewer projected tokens and knows, from the frame count alone, how
many it keeps and what its vision side costs. `VideoReduced` is `PreLLMReduced` for videos: it cuts each video's
`<video>` placeholders to the kept count, leaves the prompt's images as they are (the stock image path), and hands
the base model every visual feature in prompt order through the `<image>` slots (LLaVA-OV's positions are 0 … S-1
whatever the slot, so a video's tokens in image slots are read exactly as in video slots). Every video of a batch
has the frames of `pixel_values_videos`, and each is reduced on its own, so a sample is reduced as if alone.
They cut LLaVA-OV's per-frame token grids (`Backbone.frame_tokens`); the other families refuse them by name.
"""

from __future__ import annotations

from typing import Protocol

import torch

from visor.backbones import backbone_for
from visor.flops import llm_prefill_flops, prompt_token_counts
from visor.reduction.prellm import PreLLMReduced


class VideoReducer(Protocol):
    def video_features(self, model, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        """One (kept, d) projected tensor per video, its tokens in the order the LLM reads them."""

    def kept_tokens(self, config, frames: int) -> int:
        """Tokens `video_features` keeps for one video of `frames` frames (what the FLOP count uses)."""

    def vision_flops(self, config, frames: int) -> int:
        """FLOPs of the vision tower, projector and reduction on one video of `frames` frames."""


def is_video_reducer(reduction) -> bool:
    return hasattr(reduction, "video_features")


def supports_video(config) -> bool:
    """The video reducers cut per-frame token grids: only a family whose adapter says how many tokens a frame has."""
    return hasattr(backbone_for(config), "frame_tokens")


def check_video_backbone(config) -> None:
    """A ValueError naming `config`'s family when the video reducers do not apply to it (`supports_video`)."""
    backbone = backbone_for(config)
    if not backbone.video_inputs:
        raise ValueError(f"video reductions need a family that reads video; {type(backbone).__name__} models take none")
    if not supports_video(config):
        raise ValueError(f"video reductions (frame subsampling, EVS, video pooling) cut LLaVA-OneVision's per-frame "
                         f"token grids; they are not ported to {type(backbone).__name__} models")


def video_frames(config, inputs: dict) -> tuple[int, int]:
    """(videos, frames) of a prompt batch's `pixel_values_videos`; a ValueError for a prompt without video."""
    video_token = config.video_token_id
    pixels = inputs.get("pixel_values_videos")
    if pixels is None or not bool((inputs["input_ids"] == video_token).any()):
        raise ValueError("video reductions need a prompt with video (video tokens and pixel_values_videos); "
                         "this one has none")
    if pixels.dim() != 5:
        raise ValueError(f"pixel_values_videos must be (videos, frames, 3, H, W), got {tuple(pixels.shape)}")
    return tuple(pixels.shape[:2])


def videos_per_sample(config, inputs: dict) -> torch.Tensor:
    """(B,) videos in each prompt, from its video tokens (every video has the full count of its frames)."""
    videos, frames = video_frames(config, inputs)
    full = backbone_for(config).video_tokens(frames).visual_tokens
    valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    tokens = ((inputs["input_ids"] == config.video_token_id) & valid).sum(dim=1)
    if bool((tokens % full != 0).any()) or int(tokens.sum()) != videos * full:
        raise ValueError(f"the prompts hold {tokens.tolist()} video tokens; {videos} videos of {frames} frames are "
                         f"{full} tokens each")
    return tokens // full


class VideoReduced(PreLLMReduced):
    """`base` (a stock model or VISOR at `configuration`) reading the videos through `reducer`."""

    check_family = staticmethod(check_video_backbone)

    def model_inputs(self, input_ids, attention_mask, pixel_values=None, image_sizes=None, labels=None,
                     batch_num_images=None, pixel_values_videos=None) -> dict:
        """Arguments for the base model: the prompt with each video's placeholders cut to the kept count (its first
        ones; `labels` cut alike), the images untouched."""
        config, backbone = self.config, backbone_for(self.config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos)
        videos_per_sample(config, inputs)  # a prompt without video, or miscounted, is refused before any work
        frames = pixel_values_videos.shape[1]
        full, kept = backbone.video_tokens(frames).visual_tokens, self.reducer.kept_tokens(config, frames)
        image, video = input_ids == config.image_token_id, input_ids == config.video_token_id
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.base.training):
            videos = self.reducer.video_features(self.base, pixel_values_videos)
            images = [] if not bool(image.any()) else list(backbone.encode_images(
                self.base, int(image.sum()), pixel_values=pixel_values, image_sizes=image_sizes,
                batch_num_images=batch_num_images))
        if sum(len(features) for features in images) != int(image.sum()):
            raise ValueError(f"the prompts hold {int(image.sum())} image tokens; their images make "
                             f"{sum(len(features) for features in images)}")
        # Keep the first `kept` placeholders of each video's block (`full` long) and every other real token.
        within = (video.long().cumsum(dim=1) - 1) % full
        keep = attention_mask.bool() & (~video | (within < kept))
        features = _in_prompt_order(input_ids.masked_fill(~keep, -1), config, images, videos)
        relabelled = input_ids.masked_fill(video, config.image_token_id)
        return self.base_inputs(relabelled, attention_mask, keep, features, labels)

    # ---- cost ---------------------------------------------------------------------------------------------------
    def visual_tokens(self, inputs: dict) -> torch.Tensor:
        """(B,) visual tokens each sample sends to the LLM (its images' and its reduced videos')."""
        return reduced_visual_tokens(self.config, self.reducer, inputs)

    def vision_overhead_flops(self, inputs: dict) -> torch.Tensor:
        """(B,) zeros: what a video reduction costs on the vision side is in `vision_flops`."""
        return torch.zeros(len(inputs["input_ids"]), dtype=torch.long)

    def vision_flops(self, inputs: dict) -> torch.Tensor:
        """(B,) vision-side FLOPs of each sample's videos as reduced (frames through the tower, the reduction)."""
        _, frames = video_frames(self.config, inputs)
        return videos_per_sample(self.config, inputs) * self.reducer.vision_flops(self.config, frames)

    def prefill_flops(self, inputs: dict) -> torch.Tensor:
        return video_reduced_prefill_flops(self.config, self.reducer, inputs, self.schedule)


def reduced_visual_tokens(config, reducer: VideoReducer, inputs: dict) -> torch.Tensor:
    """(B,) visual tokens of each prompt once its videos go through `reducer` (its images as they are)."""
    _, frames = video_frames(config, inputs)
    cut = backbone_for(config).video_tokens(frames).visual_tokens - reducer.kept_tokens(config, frames)
    return prompt_token_counts(config, inputs)[0] - videos_per_sample(config, inputs) * cut


def video_reduced_prefill_flops(config, reducer: VideoReducer, inputs: dict, schedule) -> torch.Tensor:
    """(B,) LLM prefill FLOPs of a prompt batch whose videos go through `reducer`, the base model at `schedule`."""
    visual, text = reduced_visual_tokens(config, reducer, inputs), prompt_token_counts(config, inputs)[1]
    return torch.tensor([llm_prefill_flops(config, count, text_tokens, schedule).total
                         for count, text_tokens in zip(visual.tolist(), text.tolist())])


def _in_prompt_order(input_ids: torch.Tensor, config, images: list, videos: list) -> list[torch.Tensor]:
    """The images' and the videos' features merged in the order their blocks start in `input_ids` (row-major)."""
    starts = []
    for token, items in ((config.image_token_id, images), (config.video_token_id, videos)):
        if items:
            slots = (input_ids == token).flatten().nonzero().squeeze(1)
            offsets = torch.tensor([0] + [len(item) for item in items[:-1]]).cumsum(dim=0)
            starts += slots[offsets].tolist()
    return [item for _, item in sorted(zip(starts, images + videos), key=lambda pair: pair[0])]

"""Uniform frame subsampling: which frames stay, that they are the stock video path's, the entry point, errors."""

from __future__ import annotations

import pytest
import torch
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from visor.reduction import subsample_frames
from visor.reduction.frame_sampling import FrameSampling


@pytest.mark.parametrize(("stride", "frames", "kept"), [(1, 5, [0, 1, 2, 3, 4]), (2, 8, [0, 2, 4, 6]),
                                                       (3, 9, [0, 3, 6]), (4, 3, [0]), (8, 8, [0])])
def test_an_integer_stride_dividing_the_frames_keeps_every_kth(stride, frames, kept):
    assert FrameSampling(stride).kept_frames(frames) == kept


@pytest.mark.parametrize(("stride", "frames"), [(2, 5), (1.5, 7), (2.5, 32), (3, 32)])
def test_other_strides_keep_ceil_frames_over_stride_uniformly(stride, frames):
    kept = FrameSampling(stride).kept_frames(frames)
    assert len(kept) == -(-frames * 10 // int(stride * 10))  # ceil(frames / stride), in tenths
    indices = default_sample_indices_fn(VideoMetadata(total_num_frames=frames), num_frames=len(kept))
    assert kept == [int(index) for index in indices]


@torch.no_grad()
def test_kept_frames_go_through_the_stock_video_path(stock, videos):
    batch, _ = videos
    pixels = batch["pixel_values_videos"]
    reducer = FrameSampling(2)
    expected = stock.model.get_video_features(pixels[:, ::2], return_dict=True).pooler_output
    features = reducer.video_features(stock, pixels)
    assert [len(video) for video in features] == [reducer.kept_tokens(stock.config, pixels.shape[1])] * len(pixels)
    assert all(torch.equal(video, want) for video, want in zip(features, expected, strict=True))


@torch.no_grad()
def test_entry_point(stock, visor, videos):
    batch, _ = videos
    assert torch.equal(subsample_frames(stock, 1)(**batch).logits, stock(**batch).logits)
    assert subsample_frames(visor, 2).configuration == visor.config.largest_configuration
    assert not torch.equal(subsample_frames(stock, 2)(**batch).logits[:, -1], stock(**batch).logits[:, -1])


@pytest.mark.parametrize("stride", [0.5, 0, -2])
def test_bad_stride(stock, stride):
    with pytest.raises(ValueError, match="frame stride must be >= 1"):
        subsample_frames(stock, stride)

"""Every video reduction before the LLM: the off switch is the model exactly, each sample of a mixed batch is
reduced as if alone, the counted tokens are the tokens the model receives, FLOPs (vision side and LLM prefill)
agree with FlopCounterMode, generation, and bad input refused before any work."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.backbones import backbone_for
from visor.reduction import (
    EVS, VIDEO_METHODS, FrameSampling, PreLLMReduced, VideoPooling, VideoReduced, reduction_at,
)
from visor.reduction.pool import Pooling

IMAGE, VIDEO = presets.TINY_IMAGE_TOKEN_ID, presets.TINY_VIDEO_TOKEN_ID
OFF = [FrameSampling(1), EVS(0.0), VideoPooling(1)]
ON = [FrameSampling(2), FrameSampling(3), EVS(0.3), EVS(0.9), VideoPooling(2), VideoPooling(4)]


def base_of(name, stock, visor):
    return {"stock": stock, "visor": visor}[name]


@torch.no_grad()
@pytest.mark.parametrize("reducer", OFF, ids=repr)
@pytest.mark.parametrize("base", ["stock", "visor"])
def test_nothing_reduced_is_the_model_exactly(stock, visor, videos, reducer, base):
    model = base_of(base, stock, visor)
    batch, _ = videos
    assert torch.equal(VideoReduced(model, reducer)(**batch).logits, model(**batch).logits)


@torch.no_grad()
@pytest.mark.parametrize("reducer", ON, ids=repr)
@pytest.mark.parametrize("base", ["stock", "visor"])
def test_each_sample_is_reduced_as_if_alone(stock, visor, videos, alone, reducer, base):
    """A row with an image only is the base model's row (a prompt of its own without video is refused)."""
    model = base_of(base, stock, visor)
    reduced = VideoReduced(model, reducer)
    batch, kinds = videos
    together = reduced(**batch).logits[:, -1]
    for row in range(len(kinds)):
        single = (reduced if "video" in kinds[row] else model)(**alone(batch, kinds, row)).logits[0, -1]
        torch.testing.assert_close(single, together[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reducer", ON, ids=repr)
@pytest.mark.parametrize("base", ["stock", "visor"])
def test_counted_tokens_are_the_tokens_the_model_receives(stock, visor, videos, reducer, base):
    reduced = VideoReduced(base_of(base, stock, visor), reducer)
    batch, kinds = videos
    inputs = reduced.model_inputs(**batch)
    counted = reduced.visual_tokens(batch)
    full_video = backbone_for(stock.config).video_tokens(batch["pixel_values_videos"].shape[1]).visual_tokens
    kept = reducer.kept_tokens(stock.config, batch["pixel_values_videos"].shape[1])
    assert kept < full_video
    valid = batch["attention_mask"].bool()
    images = ((batch["input_ids"] == IMAGE) & valid).sum(dim=1)
    assert torch.equal(counted, images + kept * torch.tensor([row.count("video") for row in kinds]))
    text = (valid & (batch["input_ids"] != IMAGE) & (batch["input_ids"] != VIDEO)).sum(dim=1)
    assert torch.equal(inputs["attention_mask"].sum(dim=1), text + counted)
    if base == "visor":
        assert torch.equal((inputs["input_ids"] == IMAGE).sum(dim=1), counted)
        lengths = [len(features) for features in inputs["image_features"]]
        image_length = int(images.max())
        assert lengths == [image_length if kind == "image" else kept for row in kinds for kind in row]


@torch.no_grad()
def test_features_keep_the_prompt_order(stock, visor, videos):
    """Images and videos reach their own slots: the video-only rows of a reduced batch see the videos the stock
    model would read from the same (off) reduction, whatever images come before them."""
    batch, kinds = videos
    inputs = VideoReduced(visor, EVS(0.0)).model_inputs(**batch)
    encoded_images = list(backbone_for(stock.config).encode_images(visor, 0, pixel_values=batch["pixel_values"],
                                                                   image_sizes=batch["image_sizes"]))
    encoded_videos = backbone_for(stock.config).encode_videos(visor, 0,
                                                              pixel_values_videos=batch["pixel_values_videos"])
    expected = [(encoded_images if kind == "image" else encoded_videos).pop(0) for row in kinds for kind in row]
    assert all(torch.equal(got, want) for got, want in zip(inputs["image_features"], expected, strict=True))


@pytest.mark.parametrize("reducer", OFF[:1] + ON, ids=repr)
def test_flops_agree_with_the_flop_counter(stock, visor, videos, alone, video_flops_agree, reducer):
    batch, kinds = videos
    for row in (0, 1):  # an image then a video; a video alone
        for model in (VideoReduced(stock, reducer), VideoReduced(visor, reducer)):
            video_flops_agree(model, alone(batch, kinds, row))


def test_generation_keeps_the_prompt_and_matches_the_model_when_off(stock, visor, videos, generate_options):
    batch, _ = videos
    for model in (stock, visor):
        expected = model.generate(**batch, **generate_options).sequences
        assert torch.equal(VideoReduced(model, EVS(0.0)).generate(**batch, **generate_options).sequences, expected)
        for reducer in (FrameSampling(2), EVS(0.5), VideoPooling(2)):
            sequences = VideoReduced(model, reducer).generate(**batch, **generate_options).sequences
            assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)
            assert torch.equal(sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_bad_input_is_refused_before_any_work(stock, batch, videos):
    """Images only, video tokens that are not whole videos, image reductions given videos, families without video
    (or whose video the reducers do not cut)."""
    video_batch, _ = videos
    reduced = VideoReduced(stock, EVS(0.5))
    with pytest.raises(ValueError, match="need a prompt with video"):
        reduced(**batch)
    with pytest.raises(ValueError, match="need a prompt with video"):
        reduced.prefill_flops(batch)
    fewer = dict(video_batch, pixel_values_videos=video_batch["pixel_values_videos"][:-1])
    with pytest.raises(ValueError, match="video tokens; 3 videos of 4 frames"):
        reduced(**fewer)
    with pytest.raises(ValueError, match="image reductions read one image per sample, not videos"):
        PreLLMReduced(stock, Pooling(2))(**video_batch)
    with pytest.raises(ValueError, match="configuration needs a VISOR"):
        VideoReduced(stock, EVS(0.5), configuration=0)
    for preset, message in (("tiny-qwen2-vl", "Qwen2VL models take none"),
                            ("tiny-qwen2.5-vl", "not ported to Qwen2_5_VL models"),
                            ("tiny-internvl3", "InternVL models take none")):
        for method in VIDEO_METHODS:
            with pytest.raises(ValueError, match=message):
                reduction_at(presets.PRESETS[preset](2), method, 0.5)

"""Shared fixtures of the token-reduction tests: a tiny stock model, a hard batch, one plain prompt, FLOP checks,
and a video batch (videos alone, beside images, two in one prompt, and a prompt with an image only)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visor import presets
from visor.flops import image_tokens, vision_flops

VIDEO_FRAMES = 4
# Each row's parts in prompt order (see `build_video_batch`).
VIDEO_ROWS = [[2, "image", 2, "video", 3], [3, "video", 5], [2, "video", 1, "video", 2], [2, "image", 6]]

_GENERATE = dict(max_new_tokens=3, do_sample=False, pad_token_id=presets.TINY_PAD_TOKEN_ID,
                eos_token_id=2, return_dict_in_generate=True)


@pytest.fixture(scope="package")
def stock(stock_factory):
    """Six layers, eager attention (so FlopCounterMode sees the attention matmuls)."""
    return stock_factory("tiny", num_layers=6)


@pytest.fixture(scope="package")
def batch(stock, batch_factory):
    """Left padding and four different image sizes (different visual-token counts per sample)."""
    return batch_factory(stock)


@pytest.fixture(scope="package")
def generate_options():
    return dict(_GENERATE)


@pytest.fixture(scope="package")
def prompt(stock):
    return _single_prompt(stock)


@pytest.fixture(scope="package")
def flops_agree():
    """check(model, prompt): FlopCounterMode (eager) and `prefill_flops` agree within 1% on one prefill."""
    from visor.reduction import prefill_flops

    def check(model, prompt: dict) -> None:
        measured, analytic = _counted_llm_flops(model, prompt), int(prefill_flops(model, prompt)[0])
        assert abs(measured - analytic) <= 0.01 * measured, (measured, analytic)  # the tolerance `visor.flops` promises

    return check


@pytest.fixture(scope="package")
def videos(stock, video_batch_factory):
    """(batch, kinds): `VIDEO_ROWS`, left-padded, videos of `VIDEO_FRAMES` frames."""
    return video_batch_factory(stock, VIDEO_ROWS, frames=VIDEO_FRAMES)


@pytest.fixture(scope="package")
def alone():
    """row(batch, kinds, r): sample r of a video batch as a batch of its own (its images and videos, no padding)."""

    def row(batch: dict, kinds: list[list[str]], r: int) -> dict:
        valid = batch["attention_mask"][r].bool()
        single = dict(input_ids=batch["input_ids"][r][valid][None],
                      attention_mask=batch["attention_mask"][r][valid][None])
        for kind, names in (("image", ("pixel_values", "image_sizes")), ("video", ("pixel_values_videos",))):
            first = sum(items.count(kind) for items in kinds[:r])
            if kind in kinds[r]:
                single |= {name: batch[name][first: first + kinds[r].count(kind)] for name in names}
        return single

    return row


@pytest.fixture(scope="package")
def video_flops_agree():
    """check(model, prompt): FlopCounterMode's count of one prefill (eager) is the counter's exactly: LLM prefill
    (`prefill_flops`), the images' vision side and the videos' as reduced (`vision_flops`)."""
    from visor.reduction import prefill_flops

    def check(model, prompt: dict) -> None:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**prompt, logits_to_keep=1)
        sizes = prompt["image_sizes"].tolist() if "image_sizes" in prompt else []
        images = sum(vision_flops(model.config, tuple(size)).total for size in sizes)
        analytic = int(prefill_flops(model, prompt)[0]) + images + int(model.vision_flops(prompt)[0])
        assert counter.get_total_flops() == analytic

    return check


@pytest.fixture(scope="package")
def visor(stock):
    """The stock model converted to VISOR (fresh CA blocks): the base of the `visor+…` and pre-LLM reductions."""
    from visor import VisorForConditionalGeneration

    return VisorForConditionalGeneration.from_stock(stock).eval()


@pytest.fixture(scope="package")
def decoding_agrees():
    """check(model, prompt, replay=None): one token decoded through `model`'s cache equals the last logits of
    `replay` (default `model`) run on prompt + that token in one prefill."""

    @torch.no_grad()
    def check(model, prompt: dict, replay=None) -> None:
        output = model(**prompt, use_cache=True)
        next_token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        step = model(input_ids=next_token, past_key_values=output.past_key_values, use_cache=True).logits[:, -1]
        extended = dict(prompt, input_ids=torch.cat([prompt["input_ids"], next_token], dim=1),
                        attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + 1, dtype=torch.long))
        torch.testing.assert_close((replay or model)(**extended).logits[:, -1], step, atol=1e-5, rtol=0)

    return check


@pytest.fixture(scope="package")
def prompt_only():
    """scorer → the same scorer blind to the last token: a prefill of prompt + one token then ranks as the
    prompt's own prefill did (the replay `decoding_agrees` needs for scorers that read the prompt's end)."""
    from visor.reduction.pruned import Tokens

    def wrap(scorer):
        def without_last(layer, layer_input, rope, keys, tokens, layer_output):
            shortened = Tokens(tokens.index, tokens.valid & (tokens.index < tokens.length - 1), tokens.length,
                               tokens.visual)
            return scorer(layer, layer_input, rope, keys, shortened, layer_output)

        return without_last

    return wrap


def _single_prompt(stock, image_size=(128, 64), before: int = 3, after: int = 6) -> dict:
    """One unpadded prompt `[words] <image>×n [words]`, with the crops its image size needs."""
    generator = torch.Generator().manual_seed(7)
    crops, visual = image_tokens(stock.config, image_size)
    words = torch.randint(5, stock.config.text_config.vocab_size, (before + after,), generator=generator)
    ids = torch.cat([words[:before], torch.full((visual,), presets.TINY_IMAGE_TOKEN_ID), words[before:]])
    return dict(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values=torch.randn(1, crops, 3, presets.TINY_CROP, presets.TINY_CROP, generator=generator),
                image_sizes=torch.tensor([image_size]))


def _counted_llm_flops(model, prompt: dict) -> int:
    """FlopCounterMode's count of one prefill (logits at the last position), minus the vision tower."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**prompt, logits_to_keep=1)
    image_size = tuple(prompt["image_sizes"][0].tolist())
    overhead = int(model.vision_overhead_flops(prompt)[0]) if hasattr(model, "vision_overhead_flops") else 0
    return counter.get_total_flops() - vision_flops(model.config, image_size).total - overhead

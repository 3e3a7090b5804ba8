"""Shared fixtures of the token-reduction tests: a tiny stock model, a hard batch, one plain prompt, FLOP checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visor import presets
from visor.flops import image_tokens, vision_flops

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

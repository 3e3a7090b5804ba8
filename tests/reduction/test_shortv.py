"""ShortV-style freezing: text-only queries in frozen layers, visual tokens untouched there; FLOPs; errors."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.reduction.shortv import deepest_layers, shortv

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@torch.no_grad()
def test_no_frozen_layer_is_the_stock_model(stock, batch):
    valid = batch["attention_mask"].bool()
    assert torch.equal(shortv(stock, 0.0)(**batch).logits[valid], stock(**batch).logits[valid])


@torch.no_grad()
def test_freezing_the_last_layer_changes_no_text_logit(stock, batch):
    """Text tokens read the same keys and values as in the full layer; only the (unread) visual update is skipped."""
    text = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    frozen = shortv(stock, layers=[5])(**batch).logits
    torch.testing.assert_close(frozen[text], stock(**batch).logits[text], atol=1e-5, rtol=0)


@torch.no_grad()
def test_frozen_layers_leave_visual_tokens_alone(stock, batch):
    """Freezing every layer after the first: each visual token leaves the stack as layer 0 made it."""
    model = shortv(stock, layers=[1, 2, 3, 4, 5])
    hidden = {}
    handle = model.model.language_model.norm.register_forward_hook(
        lambda module, inputs, output: hidden.setdefault("in", inputs[0]))
    model(**batch)
    handle.remove()
    after_first = stock(**batch, output_hidden_states=True).hidden_states[1]
    visual = batch["input_ids"] == IMAGE
    torch.testing.assert_close(hidden["in"][visual], after_first[visual], atol=1e-6, rtol=0)


def test_cache_keeps_every_visual_key(stock, batch):
    with torch.no_grad():
        cache = shortv(stock, 0.5)(**batch, use_cache=True, logits_to_keep=1).past_key_values
    real = batch["attention_mask"].bool().sum(dim=1)
    for layer in range(6):
        assert torch.equal(cache.valid[layer].sum(dim=1), real)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree, fraction):
    flops_agree(shortv(stock, fraction), prompt)


def test_generation(stock, batch, generate_options):
    sequences = shortv(stock, 0.5).generate(**batch, **generate_options).sequences
    assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)


def test_default_layers_are_the_deepest():
    assert deepest_layers(24, 0.6) == list(range(10, 24))
    assert deepest_layers(6, 0.0) == []


@pytest.mark.parametrize("options, message", [
    (dict(fraction=1.5), "fraction of frozen layers"),
    (dict(layers=[6]), r"frozen layer must be in \[0, 5\]"),
    (dict(layers=[-1]), r"frozen layer must be in \[0, 5\]"),
    (dict(layers=[2, 2]), "distinct"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        shortv(stock, **options)

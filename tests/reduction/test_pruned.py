"""The in-LLM pruning machinery: kept counts, per-layer cache contents, batching, cached decoding."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.reduction.dart import dart
from visor.reduction.fastv import fastv, last_token_attention
from visor.reduction.pruned import PruningPlan, Tokens, kept_count, pruned, select_top
from visor.reduction.pyramiddrop import pyramiddrop
from visor.reduction.random_pruning import random_pruning
from visor.reduction.shortv import shortv
from visor.reduction.sparsevlm import sparsevlm

IMAGE = presets.TINY_IMAGE_TOKEN_ID


def test_kept_count_rounds_and_keeps_one():
    assert [kept_count(10, keep) for keep in (1.0, 0.5, 0.26, 0.01)] == [10, 5, 3, 1]
    assert kept_count(0, 0.5) == 0
    counts = torch.tensor([10, 7, 1, 0])
    assert kept_count(counts, 0.3).tolist() == [kept_count(count, 0.3) for count in counts.tolist()]


def test_select_top_keeps_text_and_drops_padding():
    visual = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    valid = torch.tensor([[True, True, True, True, True], [False, True, True, True, True]])
    tokens = Tokens(torch.arange(5).expand(2, 5), valid, 5, visual)
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.0], [0.0, 0.0, 0.2, 0.7, 0.0]])
    keep = select_top(scores, tokens, 0.5)
    assert keep.tolist() == [[True, False, True, True, True], [False, True, False, True, True]]
    kept, _ = tokens.keep(keep, torch.zeros(2, 5, 1))
    assert kept.index.tolist() == [[0, 2, 3, 4], [1, 3, 4, 5]]  # 5 = empty slot
    assert kept.valid.tolist() == [[True] * 4, [True, True, True, False]]


@pytest.mark.parametrize("build", [lambda stock: fastv(stock, 2, 0.3), lambda stock: pyramiddrop(stock, 0.5, [1, 3])],
                         ids=["fastv", "pyramiddrop"])
def test_cache_holds_exactly_the_kept_tokens_of_each_sample(stock, batch, build):
    """Per layer and sample: valid cached keys = real text + the visual tokens the plan says."""
    model = build(stock)
    with torch.no_grad():
        cache = model(**batch, use_cache=True, logits_to_keep=1).past_key_values
    real = batch["attention_mask"].bool()
    text = (real & (batch["input_ids"] != IMAGE)).sum(dim=1)
    expected = model.visual_per_layer(batch)
    assert len({tuple(row) for row in expected.tolist()}) == len(expected)  # different sizes, different counts
    for layer in range(stock.config.text_config.num_hidden_layers):
        assert torch.equal(cache.valid[layer].sum(dim=1), text + expected[:, layer])
    last = max(cache.keys)
    assert cache.keys[last].shape[2] < batch["input_ids"].shape[1]  # later layers really hold fewer keys


@pytest.mark.parametrize("build", [
    lambda stock: fastv(stock, 2, 0.4),
    lambda stock: pyramiddrop(stock, 0.5, [1, 3]),
    lambda stock: sparsevlm(stock, 0.4, [1, 3]),
    lambda stock: shortv(stock, 0.5),
    lambda stock: random_pruning(stock, 0.4),
    lambda stock: dart(stock, 2, 0.4),
], ids=["fastv", "pyramiddrop", "sparsevlm", "shortv", "random", "dart"])
@torch.no_grad()
def test_each_sample_in_a_padded_batch_is_reduced_as_alone(stock, batch, build):
    model = build(stock)
    together = model(**batch, logits_to_keep=1).logits
    for row in range(len(batch["input_ids"])):
        real = batch["attention_mask"][row].bool()
        alone = dict(input_ids=batch["input_ids"][row][real][None], pixel_values=batch["pixel_values"][row:row + 1],
                     image_sizes=batch["image_sizes"][row:row + 1])
        torch.testing.assert_close(model(**alone, logits_to_keep=1).logits[0], together[row], atol=1e-5, rtol=0)


def test_cached_decoding_equals_a_prefill_that_reuses_the_pruned_set(stock, prompt, decoding_agrees, prompt_only):
    """One decoded token through the pruned cache = recomputing it on the kept tokens (scores from the prompt)."""
    decoding_agrees(fastv(stock, 2, 0.4), prompt, replay=pruned(stock, PruningPlan({2: 0.4}, prompt_only(
        last_token_attention))))


def test_weights_are_shared_not_copied(stock):
    model = fastv(stock, 2, 0.5)
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), stock.state_dict().items()):
        assert mine.data_ptr() == theirs.data_ptr(), name
    assert not any(parameter.is_meta for parameter in model.parameters())
    assert not any(buffer.is_meta for buffer in model.buffers())


@torch.no_grad()
def test_image_features_replace_pixels_and_cache_bytes_split(stock, prompt):
    model = fastv(stock, 2, 0.5)
    features = stock.model.get_image_features(prompt["pixel_values"], prompt["image_sizes"], return_dict=True).pooler_output
    from_pixels = model(**prompt, use_cache=True)
    from_features = model(input_ids=prompt["input_ids"], image_features=features, use_cache=True)
    assert torch.equal(from_pixels.logits, from_features.logits)
    cache = from_features.past_key_values
    text_config = stock.config.text_config
    per_key = 2 * text_config.num_key_value_heads * (text_config.hidden_size // text_config.num_attention_heads) * 4
    visual = int((prompt["input_ids"] == IMAGE).sum())
    layers = stock.config.text_config.num_hidden_layers
    assert cache.nbytes()["visual"] == per_key * (2 * visual + (layers - 2) * kept_count(visual, 0.5))
    assert cache.nbytes()["text"] == per_key * layers * (prompt["input_ids"].shape[1] - visual)


def test_flops_agree_on_a_llama_text_model(stock_factory, flops_agree):
    """The same counts hold for a Llama decoder (no q/k/v biases) as for Qwen2."""
    llama = stock_factory("tiny-llama", num_layers=4)
    generator = torch.Generator().manual_seed(3)
    prompt = dict(input_ids=torch.cat([torch.randint(5, 500, (1, 3), generator=generator),
                                       torch.full((1, 136), IMAGE), torch.randint(5, 500, (1, 5), generator=generator)], 1),
                  pixel_values=torch.randn(1, 2, 3, 64, 64, generator=generator), image_sizes=torch.tensor([[64, 64]]))
    for model in (fastv(llama, 1, 0.3), pyramiddrop(llama, 0.5, [1, 2]), sparsevlm(llama, 0.5, [1, 3]),
                  shortv(llama, 0.5), random_pruning(llama, 0.3), dart(llama, 1, 0.3)):
        flops_agree(model, prompt)

"""The sparse VISOR cache: cached decoding equals recomputation, and vision is cached only where it is read."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from visor import VisorConfig, VisorForConditionalGeneration, presets
from visor.modeling.cache import VisorCache

IMAGE_SIZES = torch.tensor([[64, 128], [128, 64], [64, 64]])
TEXT_LENGTHS = [5, 9, 3]


@pytest.fixture(scope="module")
def stock():
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(presets.tiny(6)).eval()


@pytest.fixture(scope="module")
def batch(stock):
    """Three left-padded prompts, images of different aspect ratios, text before and after the image."""
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(3, 5, 3, 64, 64, generator=generator)
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values, IMAGE_SIZES, return_dict=True).pooler_output
    prompts = []
    for image, text_length in zip(features, TEXT_LENGTHS):
        words = torch.randint(5, 500, (text_length - 3,), generator=generator).tolist()
        prompts.append([1, 10, 11] + [presets.TINY_IMAGE_TOKEN_ID] * image.shape[0] + words)
    length = max(map(len, prompts))
    input_ids = torch.zeros(3, length, dtype=torch.long)
    attention_mask = torch.zeros(3, length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=IMAGE_SIZES)


@pytest.fixture(scope="module")
def visor(stock):
    """A default sparse VISOR (2 CA layers, SA candidates [1, 4]) with gates open and a non-zero CPE."""
    torch.manual_seed(2)
    model = VisorForConditionalGeneration.from_stock(stock).eval()
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attention_gate.fill_(0.7)
        model.position_encoding.conv.weight.normal_(0, 0.1)
    return model


def greedy(model, batch, steps=6, **kwargs):
    return model.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)


@torch.no_grad()
def recompute_greedy(model, batch, configuration, steps=6):
    """Greedy decoding by re-running the whole prompt + generated tokens each step, no cache at all."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], configuration=configuration,
        ).logits
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
    return input_ids


@pytest.mark.parametrize("configuration", [0, 1, 2, [0, 2, 1], [2, 0, 2]])
def test_cached_greedy_equals_recomputation(visor, batch, configuration):
    cached = greedy(visor, batch, configuration=configuration)
    assert torch.equal(cached, recompute_greedy(visor, batch, configuration))


def test_cached_greedy_with_fewer_cross_attention_heads_equals_recomputation(stock, batch):
    torch.manual_seed(3)
    model = VisorForConditionalGeneration.from_stock(stock, cross_attention_key_value_heads=1,
                                                     cross_attention_init="host", cross_attention_gate=False).eval()
    assert all(block.k_proj.out_features == block.head_dim for block in model.cross_attention.values())
    configuration = [0, 2, 1]
    assert torch.equal(greedy(model, batch, configuration=configuration), recompute_greedy(model, batch, configuration))


def test_cached_logits_match_recomputed_logits(visor, batch):
    """Stronger than token equality: the decode-step logits equal the full recomputation's last logits."""
    configuration = [1, 2, 0]
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        prefill = visor(**batch, position_ids=position_ids, configuration=configuration, use_cache=True)
        next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
        step = visor(
            input_ids=next_ids, attention_mask=attention_mask, position_ids=position_ids[:, -1:] + 1,
            past_key_values=prefill.past_key_values, use_cache=True,
        )
        full = visor(
            input_ids=torch.cat([batch["input_ids"], next_ids], dim=1), attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], configuration=configuration,
        )
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_dense_generation_equals_stock(stock, batch):
    dense = VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval()
    assert torch.equal(greedy(dense, batch), greedy(stock, batch))


def test_visual_cache_only_in_layers_the_configuration_reads(visor, batch):
    config = visor.config
    for configuration in range(len(config.configurations)):
        with torch.no_grad():
            cache = visor(**batch, configuration=configuration, use_cache=True, logits_to_keep=1).past_key_values
        used = config.configurations[configuration]
        assert sorted(cache.visual_keys) == sorted(used)
        assert sorted(cache.cross_keys) == sorted(config.cross_attention_layers)
        assert sorted(cache.text_keys) == list(range(config.num_layers))


def test_mixed_batch_caches_vision_only_for_rows_that_ran_sa(visor, batch):
    with torch.no_grad():
        cache = visor(**batch, configuration=[0, 2, 1], use_cache=True, logits_to_keep=1).past_key_values
    # Layer 1 is SA for configurations 1 and 2 (rows 1, 2); layer 4 only for configuration 2 (row 1).
    assert cache.visual_rows[1].tolist() == [1, 2]
    assert cache.visual_rows[4].tolist() == [1]
    assert cache.visual_keys[4].shape[0] == 1


def test_visual_cache_shrinks_by_the_layout_factor(stock, visor, batch):
    """Visual KV bytes of configuration c = (|CA| + |SA used|) / L of the dense model's, exactly."""
    dense = VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval()
    with torch.no_grad():
        dense_bytes = dense(**batch, use_cache=True, logits_to_keep=1).past_key_values.nbytes()["visual"]
        for configuration, used in enumerate(visor.config.configurations):
            cache = visor(**batch, configuration=configuration, use_cache=True, logits_to_keep=1).past_key_values
            layers_with_vision = len(visor.config.cross_attention_layers) + len(used)
            assert cache.nbytes()["visual"] * visor.config.num_layers == dense_bytes * layers_with_vision


def test_sampling_is_reproducible_and_matches_uncached(visor, batch):
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0, configuration=1)
    torch.manual_seed(3)
    cached = visor.generate(**batch, **kwargs)
    torch.manual_seed(3)
    uncached = visor.generate(**batch, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_the_sparse_cache(visor, batch):
    kwargs = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0, configuration=[0, 2, 1])
    assert torch.equal(visor.generate(**batch, **kwargs), visor.generate(**batch, **kwargs, use_cache=False))


def test_streaming_and_stopping_criteria(visor, batch):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    single = {key: value[:1] for key, value in batch.items()}
    prompt_length = single["input_ids"].shape[1]
    streamer = Collect()
    output = visor.generate(
        **single, max_new_tokens=10, do_sample=False, pad_token_id=0, streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAfter(prompt_length + 3)]),
    )
    assert output.shape[1] == prompt_length + 3
    streamed = torch.cat([chunk.view(-1) for chunk in streamer.chunks[1:-1]])
    assert torch.equal(streamed, output[0, prompt_length:])
    assert streamer.chunks[-1] is None


def test_generate_creates_a_visor_cache(visor, batch):
    output = visor.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(output.past_key_values, VisorCache)
    assert output.past_key_values.get_seq_length() == batch["input_ids"].shape[1] + 1


def test_decoding_rejects_image_tokens_and_foreign_caches(visor, batch):
    with torch.no_grad():
        cache = visor(**batch, use_cache=True, logits_to_keep=1).past_key_values
        image_token = torch.full((3, 1), presets.TINY_IMAGE_TOKEN_ID)
        with pytest.raises(ValueError, match="must be text"):
            visor(input_ids=image_token, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="batch of 1"):
            visor(input_ids=torch.ones(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="VisorCache"):
        visor(**batch, past_key_values=object(), use_cache=True)


def test_resolve_cache_swaps_only_an_empty_stock_cache():
    from transformers import DynamicCache

    from visor.modeling.cache import resolve_cache

    own = VisorCache()
    assert resolve_cache(own, True, VisorCache, "VISOR") is own
    assert isinstance(resolve_cache(DynamicCache(), True, VisorCache, "VISOR"), VisorCache)
    assert resolve_cache(None, False, VisorCache, "VISOR") is None
    filled = DynamicCache()
    filled.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    with pytest.raises(ValueError, match="VISOR needs a VisorCache"):
        resolve_cache(filled, True, VisorCache, "VISOR")

"""Random pruning, in the LLM and before it: off switch, seeded and batch-independent subsets, FLOPs, decoding."""

from __future__ import annotations

import pytest
import torch

from visor import presets
from visor.reduction import random_pruning
from visor.reduction.pruned import kept_count
from visor.reduction.random_pruning import RandomSubset, seeded_scores

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@torch.no_grad()
def test_keep_everything_is_the_model_exactly(stock, visor, batch):
    valid = batch["attention_mask"].bool()
    expected = stock(**batch).logits
    assert torch.equal(random_pruning(stock, 1.0)(**batch).logits[valid], expected[valid])
    assert torch.equal(random_pruning(stock, 1.0, before_llm=True)(**batch).logits, expected)
    assert torch.equal(random_pruning(visor, 1.0, before_llm=True)(**batch).logits, visor(**batch).logits)


def test_scores_are_fixed_by_seed_count_and_rank_and_look_uniform():
    ranks = torch.arange(1, 20001)
    scores = seeded_scores(0, torch.tensor(20000), ranks)
    assert torch.equal(scores, seeded_scores(0, torch.tensor(20000), ranks))
    assert not torch.equal(scores, seeded_scores(1, torch.tensor(20000), ranks))
    assert not torch.equal(scores[:100], seeded_scores(0, torch.tensor(19999), ranks[:100]))
    assert float(scores.min()) >= 0 and float(scores.max()) < 1
    assert abs(float(scores.mean()) - 0.5) < 0.01 and len(scores.unique()) > 19990
    # Deciles hold a tenth each (within 4 standard deviations of a binomial count).
    counts = torch.histc(scores.float(), bins=10, min=0, max=1)
    assert float((counts - 2000).abs().max()) < 4 * (20000 * 0.1 * 0.9) ** 0.5


@torch.no_grad()
def test_each_sample_keeps_a_seeded_subset_of_its_budget_in_any_batch(stock, batch):
    model = random_pruning(stock, 0.3, layer=2)
    cache = model(**batch, use_cache=True, logits_to_keep=1).past_key_values
    visual = (batch["input_ids"] == IMAGE) & batch["attention_mask"].bool()
    kept = cache.visual[3].sum(dim=1)
    assert kept.tolist() == [kept_count(count, 0.3) for count in visual.sum(dim=1).tolist()]
    reversed_batch = {key: value.flip(0) for key, value in batch.items()}  # another batch order: the same subsets
    flipped = model(**reversed_batch, use_cache=True, logits_to_keep=1).past_key_values
    assert torch.equal(flipped.valid[3].sum(dim=1), cache.valid[3].sum(dim=1).flip(0))
    assert torch.equal(flipped.keys[5].sum(dim=(1, 3)).sort(dim=1).values, cache.keys[5].sum(dim=(1, 3)).flip(0).sort(
        dim=1).values)
    other_seed = random_pruning(stock, 0.3, layer=2, seed=1)(**batch, use_cache=True, logits_to_keep=1).past_key_values
    assert not torch.equal(other_seed.keys[5], cache.keys[5])


def test_cached_decoding_equals_recomputing_the_prompt_and_token(stock, prompt, decoding_agrees):
    """The subset depends on the visual tokens only, so a prefill of prompt + token prunes the same ones."""
    decoding_agrees(random_pruning(stock, 0.4), prompt)


def test_before_the_llm_each_image_keeps_its_budget_and_its_newlines(visor, batch):
    reduced = random_pruning(visor, 0.25, before_llm=True)
    inputs = reduced.model_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    counts = [len(image) for image in inputs["image_features"]]
    assert counts == reduced.visual_tokens(batch).tolist()
    assert torch.equal((inputs["input_ids"] == IMAGE).sum(dim=1), torch.tensor(counts))
    features = torch.arange(10.0)[:, None]
    grid = torch.ones(10, dtype=torch.bool)
    grid[[3, 7]] = False
    kept = RandomSubset(0.5, seed=3).subset(features, grid)[:, 0]
    assert {3.0, 7.0} <= set(kept.tolist()) and len(kept) == 4 + 2 and kept.tolist() == sorted(kept.tolist())
    assert torch.equal(kept, RandomSubset(0.5, seed=3).subset(features, grid)[:, 0])


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_flops_agree_with_the_flop_counter(stock, visor, prompt, flops_agree, keep):
    for model in (random_pruning(stock, keep), random_pruning(stock, keep, layer=4),
                  random_pruning(stock, keep, before_llm=True), random_pruning(visor, keep, before_llm=True)):
        flops_agree(model, prompt)


def test_generation(stock, batch, generate_options):
    for model in (random_pruning(stock, 0.2), random_pruning(stock, 0.2, before_llm=True)):
        sequences = model.generate(**batch, **generate_options).sequences
        assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("options, message", [
    (dict(keep=0.0), "keep must be a fraction in"),
    (dict(keep=1.5, before_llm=True), "keep must be a fraction in"),
    (dict(layer=0), r"layer must be in \[1, 5\]"),
    (dict(seed=None), "needs an integer seed"),
    (dict(seed=1.5, before_llm=True), "needs an integer seed"),
    (dict(configuration=0), "applies before the LLM only"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        random_pruning(stock, **{"keep": 0.5, **options})

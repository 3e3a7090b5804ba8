"""SparseVLM: off switch, per-layer counts with recycling, raters, recycling merge, FLOPs, generation, errors."""

from __future__ import annotations

import pytest
import torch

from visor.reduction.fastv import last_token_attention
from visor.reduction.pruned import PruningPlan, Tokens, kept_count, pruned
from visor.reduction.sparsevlm import Recycling, default_layers, rater_attention, sparsevlm


@torch.no_grad()
def test_keep_everything_is_the_stock_model(stock, batch):
    valid = batch["attention_mask"].bool()
    assert torch.equal(sparsevlm(stock, 1.0)(**batch).logits[valid], stock(**batch).logits[valid])


def test_cache_holds_kept_plus_recycled_tokens(stock, batch):
    model = sparsevlm(stock, 0.4, layers=[1, 3])
    with torch.no_grad():
        cache = model(**batch, use_cache=True, logits_to_keep=1).past_key_values
    text = (batch["attention_mask"].bool() & (batch["input_ids"] != stock.config.image_token_id)).sum(dim=1)
    counts = model.visual_per_layer(batch)
    for layer in range(6):
        assert torch.equal(cache.valid[layer].sum(dim=1), text + counts[:, layer])
    start = counts[:, 0]
    kept = kept_count(start, 0.4)
    recycled = torch.tensor([Recycling().count(int(dropped)) for dropped in start - kept])
    assert (recycled > 0).all() and torch.equal(counts[:, 1], kept + recycled)


def test_recycling_counts_follow_the_reference():
    recycling = Recycling()
    assert [recycling.count(dropped) for dropped in (0, 1, 10, 100, 576)] == [0, 1, 1, 4, 18]


def test_recycled_token_is_the_mean_of_its_cluster():
    hidden = torch.tensor([[[1.0, 0], [0, 1.0], [0.9, 0.1], [0.1, 0.9], [5.0, 5.0]]])
    tokens = Tokens(torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool), 5,
                    torch.tensor([[True, True, True, True, False]]))
    keep = torch.tensor([[False, False, False, False, True]])
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0]])
    keep, merged = Recycling(share=1.0, per_cluster=2)(scores, tokens, keep, hidden)  # 4 candidates, 3 centres
    assert keep.tolist() == [[True, True, True, False, True]]
    torch.testing.assert_close(merged[0, 1], (hidden[0, 1] + hidden[0, 3]) / 2)
    torch.testing.assert_close(merged[0, 0], hidden[0, 0])


@torch.no_grad()
def test_one_question_token_rates_alone(stock, batch_factory):
    """With a single token after the image, the raters' attention is that token's own row (FastV's score)."""
    batch = batch_factory(stock, text_after=1)
    recorded = {}

    def recording(name, scorer):
        def score(*args):
            recorded[name] = scorer(*args)
            return recorded[name]
        return score

    for name, scorer in (("raters", rater_attention), ("last", last_token_attention)):
        pruned(stock, PruningPlan({2: 0.5}, recording(name, scorer)))(**batch, logits_to_keep=1)
    torch.testing.assert_close(recorded["raters"], recorded["last"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree, keep):
    flops_agree(sparsevlm(stock, keep), prompt)


def test_generation(stock, batch, generate_options):
    sequences = sparsevlm(stock, 0.3).generate(**batch, **generate_options).sequences
    assert sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 3)


def test_default_layers_scale_the_reference():
    assert default_layers(32) == [2, 6, 15]
    assert default_layers(24) == [2, 5, 11]
    assert default_layers(6) == [1, 3]


@pytest.mark.parametrize("options, message", [
    (dict(keep=0.0), "keep must be a fraction"),
    (dict(layers=[0]), "pruning layer must be in"),
    (dict(layers=[2, 2]), "distinct"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        sparsevlm(stock, **options)

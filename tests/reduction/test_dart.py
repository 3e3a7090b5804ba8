"""DART: off switch, the claimed set equals a plain per-sample reading of the method, budgets, FLOPs, decoding."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from visor import presets
from visor.reduction import dart
from visor.reduction.dart import PIVOTS, claimed_order
from visor.reduction.pruned import PruningPlan, Tokens, kept_count, pruned

IMAGE = presets.TINY_IMAGE_TOKEN_ID


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_keep_everything_is_the_stock_model(stock_factory, batch_factory, attention):
    stock = stock_factory("tiny-llama", num_layers=4, attention=attention)
    batch = batch_factory(stock)
    valid = batch["attention_mask"].bool()
    assert torch.equal(dart(stock, 2, 1.0)(**batch).logits[valid], stock(**batch).logits[valid])


def _plain_dart(keys: torch.Tensor, states: torch.Tensor, visual: list[int], question: list[int], keep: float) -> set:
    """One sample, as the method reads: pivots by key norm, then each pivot claims its share of the least similar
    visual tokens left (`keys` (n, H·hd), `states` (n, d), slot lists of its visual and question tokens)."""
    norms = keys.norm(dim=-1)
    budget = kept_count(len(visual), keep)
    visual_pivots = sorted(visual, key=lambda slot: -float(norms[slot]))[: min(PIVOTS, budget)]
    text_pivots = sorted(question, key=lambda slot: -float(norms[slot]))[:PIVOTS]
    pivots = visual_pivots + text_pivots
    left = budget - len(visual_pivots)
    shares = [left // len(pivots) + (index < left % len(pivots)) for index in range(len(pivots))]
    kept, open_ = set(visual_pivots), [slot for slot in visual if slot not in visual_pivots]
    for pivot, share in zip(pivots, shares):
        similarity = functional.cosine_similarity(states[pivot][None], states[open_], dim=-1)
        claimed = [open_[i] for i in similarity.argsort(stable=True)[:share].tolist()]
        kept |= set(claimed)
        open_ = [slot for slot in open_ if slot not in claimed]
    return kept


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.7])
@torch.no_grad()
def test_the_claimed_set_is_the_method_read_plainly_for_every_sample(stock, batch, keep):
    recorded = {}

    def recording(layer, layer_input, rope, keys, tokens, layer_output):
        recorded.update(keys=keys, tokens=tokens, states=layer_output)
        return claimed_order(keys, layer_output, tokens, keep)

    pruned(stock, PruningPlan({2: keep}, recording))(**batch, logits_to_keep=1)
    tokens: Tokens = recorded["tokens"]
    order = claimed_order(recorded["keys"], recorded["states"], tokens, keep)
    keys = recorded["keys"].transpose(1, 2).flatten(2)
    for row in range(len(order)):
        slots = [slot for slot in range(tokens.width) if tokens.valid[row, slot]]
        visual = [slot for slot in slots if tokens.visual[row, slot]]
        question = [slot for slot in slots if slot > max(visual) and not tokens.visual[row, slot]]
        expected = _plain_dart(keys[row], recorded["states"][row].float(), visual, question, keep)
        assert set((order[row] > 0).nonzero().flatten().tolist()) == expected
        assert len(expected) == kept_count(len(visual), keep)  # the budget exactly, pivots included


@torch.no_grad()
def test_each_sample_keeps_its_budget_in_the_cache(stock, batch):
    cache = dart(stock, 2, 0.3)(**batch, use_cache=True, logits_to_keep=1).past_key_values
    visual = ((batch["input_ids"] == IMAGE) & batch["attention_mask"].bool()).sum(dim=1)
    assert cache.visual[2].sum(dim=1).tolist() == [kept_count(count, 0.3) for count in visual.tolist()]
    assert torch.equal(cache.visual[1].sum(dim=1), visual)


def test_cached_decoding_equals_a_prefill_that_reuses_the_pruned_set(stock, prompt, decoding_agrees, prompt_only):
    """The question's pivots come from the prompt: recomputing prompt + token chooses with the token left out."""
    replay = pruned(stock, PruningPlan({2: 0.4}, prompt_only(
        lambda layer, layer_input, rope, keys, tokens, layer_output: claimed_order(keys, layer_output, tokens, 0.4))))
    decoding_agrees(dart(stock, 2, 0.4), prompt, replay=replay)


@pytest.mark.parametrize("layer, keep", [(2, 1.0), (2, 0.5), (1, 0.1), (5, 0.3)])
def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree, layer, keep):
    flops_agree(dart(stock, layer, keep), prompt)


def test_the_scoring_cost_is_one_similarity_row_per_pivot(stock, prompt):
    from visor.reduction.fastv import fastv

    # Same kept tokens per layer as FastV at the same keep; DART's ranking costs 8 rows of 2 · n · d instead.
    tokens = prompt["input_ids"].shape[1]
    difference = int(dart(stock, 2, 0.5).prefill_flops(prompt)[0]) - int(fastv(stock, 2, 0.5).prefill_flops(prompt)[0])
    text = stock.config.text_config
    attention_row = 2 * text.hidden_size * text.hidden_size + 2 * text.num_attention_heads * tokens * (
        text.hidden_size // text.num_attention_heads)
    assert difference == 2 * PIVOTS * 2 * tokens * text.hidden_size - attention_row


def test_generation(stock, batch, generate_options):
    expected = stock.generate(**batch, **generate_options).sequences
    assert torch.equal(dart(stock, 2, 1.0).generate(**batch, **generate_options).sequences, expected)
    sequences = dart(stock, 2, 0.2).generate(**batch, **generate_options).sequences
    assert sequences.shape == expected.shape


@pytest.mark.parametrize("options, message", [
    (dict(keep=0.0), "keep must be a fraction in"),
    (dict(keep=1.5), "keep must be a fraction in"),
    (dict(layer=0), r"layer must be in \[1, 5\]"),
    (dict(image_pivots=0), "at least one visual pivot"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        dart(stock, **options)

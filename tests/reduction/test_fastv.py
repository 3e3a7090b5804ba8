"""FastV: off switch, scores equal the eager attention row, FLOPs, generation, errors."""

from __future__ import annotations

import pytest
import torch

from visor.reduction.fastv import fastv, last_token_attention
from visor.reduction.pruned import PruningPlan, pruned


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_keep_everything_is_the_stock_model(stock_factory, batch_factory, attention):
    stock = stock_factory("tiny-llama", num_layers=4, attention=attention)
    batch = batch_factory(stock)
    valid = batch["attention_mask"].bool()
    expected = stock(**batch).logits
    assert torch.equal(fastv(stock, 2, 1.0)(**batch).logits[valid], expected[valid])


@torch.no_grad()
def test_scores_are_the_head_averaged_attention_row_of_the_last_token(stock, batch):
    """What the reference reads from `output_attentions` at layer K-1, here without an eager (S, S) matrix."""
    recorded = []

    def recording(*args):
        recorded.append(last_token_attention(*args))
        return recorded[-1]

    pruned(stock, PruningPlan({2: 0.5}, recording))(**batch, logits_to_keep=1)
    attentions = stock(**batch, output_attentions=True).attentions[1]  # layer K-1 = 1
    torch.testing.assert_close(recorded[0], attentions[:, :, -1].mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer, keep", [(2, 1.0), (2, 0.5), (1, 0.1), (5, 0.3)])
def test_flops_agree_with_the_flop_counter(stock, prompt, flops_agree, layer, keep):
    flops_agree(fastv(stock, layer, keep), prompt)


def test_generation(stock, batch, generate_options):
    expected = stock.generate(**batch, **generate_options).sequences
    assert torch.equal(fastv(stock, 2, 1.0).generate(**batch, **generate_options).sequences, expected)
    sequences = fastv(stock, 2, 0.2).generate(**batch, **generate_options).sequences
    assert sequences.shape == expected.shape
    assert torch.equal(sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("options, message", [
    (dict(keep=0.0), "keep must be a fraction in"),
    (dict(keep=1.5), "keep must be a fraction in"),
    (dict(layer=0), r"layer must be in \[1, 5\]"),
    (dict(layer=6), r"layer must be in \[1, 5\]"),
])
def test_bad_input(stock, options, message):
    with pytest.raises(ValueError, match=message):
        fastv(stock, **options)

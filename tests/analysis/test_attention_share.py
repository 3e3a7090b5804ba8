"""Attention shares: token groups from ids, shares over all groups sum to 1 per query, eager only where measured,
and the numbers equal those read from a fully eager model's `output_attentions`."""

from __future__ import annotations

import pytest
import torch

from visor.analysis.attention_share import GROUPS, PADDING, ShareAccumulator, group_mass, token_groups
from visor.analysis.probe import probe

IMAGE = 3


def test_token_groups_from_ids():
    input_ids = torch.tensor([[0, 1, 7, IMAGE, IMAGE, 8, 9, 20, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0]])
    groups = token_groups(input_ids == IMAGE, attention_mask, prompt_length=7)
    names = [GROUPS[g] if g != PADDING else "pad" for g in groups[0].tolist()]
    assert names == ["pad", "prefix", "prefix", "image", "image", "question", "question", "answer", "pad"]


@pytest.fixture(scope="module")
def probed(stock_factory, batch_factory):
    """A tiny eager model, a padded batch with two answer tokens appended, and its weights in every layer."""
    stock = stock_factory("tiny", num_layers=3, attention="eager")
    batch = batch_factory(stock)
    prompt_length = batch["input_ids"].shape[1]
    answers = torch.tensor([[11, 12], [13, 0], [14, 15], [16, 0]])
    batch["input_ids"] = torch.cat([batch["input_ids"], answers], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], (answers != 0).long()], dim=1)
    groups = token_groups(batch["input_ids"] == IMAGE, batch["attention_mask"], prompt_length)
    weights = {}
    with torch.no_grad():
        probe(stock, measure=[0, 2], on_weights=lambda layer, w: weights.__setitem__(layer, w))(**batch)
    return stock, batch, groups, weights


def test_shares_of_all_groups_sum_to_one_per_query(probed):
    _, batch, groups, weights = probed
    for layer_weights in weights.values():
        mass = group_mass(layer_weights, groups)
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(mass.sum(dim=-1)[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
        assert (mass >= 0).all()


def test_eager_only_in_measured_layers(probed):
    """Layer 1 was not measured: its attention ran through SDPA and handed over no weights."""
    _, _, _, weights = probed
    assert sorted(weights) == [0, 2]


def test_weights_equal_the_eager_models_output_attentions(probed):
    stock, batch, _, weights = probed
    with torch.no_grad():
        reference = stock(**batch, output_attentions=True).attentions
    valid = batch["attention_mask"].bool()  # (B, Q) queries that are not padding
    for layer, layer_weights in weights.items():
        torch.testing.assert_close(layer_weights.transpose(1, 2)[valid], reference[layer].transpose(1, 2)[valid],
                                   atol=1e-6, rtol=0)


def test_accumulated_shares_are_per_role_averages_that_sum_to_one(probed):
    _, _, groups, weights = probed
    accumulator = ShareAccumulator(num_layers=3)
    accumulator.start_batch(["hard_task", "hard_task", "easy_task", "easy_task"], groups)
    for layer, layer_weights in weights.items():
        accumulator(layer, layer_weights)
    result = accumulator.result({"hard_task": "hard", "easy_task": "easy"})
    assert set(result["task_groups"]) == {"hard", "easy"}
    for entry in result["tasks"].values():
        for role in ("question", "answer"):
            totals = [sum(entry["shares"][role][group][layer] for group in GROUPS) for layer in (0, 2)]
            assert totals == pytest.approx([1.0, 1.0], abs=1e-5)
            assert entry["shares"][role]["image"][1] is None  # layer 1 was not measured
            assert sum(entry["uniform"][role].values()) == pytest.approx(1.0, abs=1e-5)
            assert 0.5 < entry["uniform"][role]["image"] < 1.0  # most visible keys are image tokens

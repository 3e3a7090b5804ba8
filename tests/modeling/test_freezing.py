"""Stage-1 freezing: gradients reach the CA blocks, gates and CPE only, and base weights never move."""

from __future__ import annotations

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration
from visor.modeling import freeze_base, trainable_parameter_names, trainable_parameters, unfreeze_all

IMAGE = 3


def is_new(name: str) -> bool:
    return name.startswith(("cross_attention.", "position_encoding."))


@pytest.fixture(scope="module")
def stock(stock_factory):
    return stock_factory("tiny", num_layers=6)


@pytest.fixture(scope="module")
def batch(stock, batch_factory):
    batch = batch_factory(stock, image_sizes=[(64, 128), (50, 120)])
    labels = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE), -100)
    return batch | dict(labels=labels)


def frozen_model(stock, gate: float | None) -> VisorForConditionalGeneration:
    torch.manual_seed(4)
    model = VisorForConditionalGeneration.from_stock(stock)
    with torch.no_grad():
        if gate is not None:
            for block in model.cross_attention.values():
                block.attention_gate.fill_(gate)
            model.position_encoding.conv.weight.normal_(0, 0.1)
    return freeze_base(model.train())


def backward(model, batch, configuration=None):
    model.zero_grad(set_to_none=True)
    model(**batch, configuration=configuration).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


def test_freeze_base_leaves_only_the_new_modules_trainable(stock):
    model = frozen_model(stock, gate=None)
    names = trainable_parameter_names(model)
    assert names and all(is_new(name) for name in names)
    assert {name for name, _ in model.named_parameters() if is_new(name)} == set(names)
    assert any(name.endswith("attention_gate") for name in names)
    assert "position_encoding.conv.weight" in names
    assert sum(p.numel() for p in trainable_parameters(model)) < sum(p.numel() for p in model.parameters()) / 5


def test_open_gates_send_gradients_to_ca_blocks_and_cpe_only(stock, batch):
    model = frozen_model(stock, gate=0.5)
    grads = backward(model, batch)
    for name, grad in grads.items():
        if is_new(name):
            assert grad is not None and torch.isfinite(grad).all(), name
        else:
            assert grad is None, name
    for block in ("0", "3"):
        for part in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "attention_gate"):
            assert grads[f"cross_attention.{block}.{part}"].abs().max() > 0, (block, part)
    assert grads["position_encoding.conv.weight"].abs().max() > 0


def test_closed_gates_send_gradient_to_the_gates_only(stock, batch):
    """tanh(0) = 0 blocks every path through the CA block except the gate's own derivative (1 - tanh² = 1)."""
    model = frozen_model(stock, gate=None)
    grads = backward(model, batch)
    for block in ("0", "3"):
        assert grads[f"cross_attention.{block}.attention_gate"].abs().max() > 0
        for part in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            assert grads[f"cross_attention.{block}.{part}"].abs().max() == 0, (block, part)
    assert all(grad is None for name, grad in grads.items() if not is_new(name))


def test_optimizer_step_leaves_every_base_weight_bit_identical(stock, batch):
    model = frozen_model(stock, gate=0.5)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    for configuration in (0, 2):
        optimizer.zero_grad()
        model(**batch, configuration=configuration).loss.backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        if is_new(name):
            continue
        assert torch.equal(parameter, before[name]), name
    moved = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert moved and all(is_new(name) for name in moved)
    assert "cross_attention.0.q_proj.weight" in moved and "position_encoding.conv.weight" in moved


def test_even_an_optimizer_over_all_parameters_cannot_move_frozen_weights(stock, batch):
    """Frozen weights get no .grad at all, so weight decay and momentum skip them."""
    model = frozen_model(stock, gate=0.5)
    before = model.model.language_model.layers[1].mlp.up_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, before)


def test_unfreeze_all_makes_everything_trainable(stock, batch):
    model = unfreeze_all(frozen_model(stock, gate=0.5))
    names = trainable_parameter_names(model)
    assert names == [name for name, _ in model.named_parameters()]
    grads = backward(model, batch)
    assert grads["model.language_model.layers.0.self_attn.q_proj.weight"].abs().max() > 0


def test_freeze_base_refuses_a_model_with_nothing_new(stock):
    model = VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config, position_encoding=False))
    with pytest.raises(ValueError, match="nothing trainable"):
        freeze_base(model)

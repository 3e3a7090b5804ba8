"""`probe`: outputs unchanged when only measuring, blind layers equal VISOR's text layers, read layers keep image
tokens and still let text read them."""

from __future__ import annotations

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration
from visor.analysis.probe import probe

LAYERS = 6


@pytest.fixture(scope="module")
def stock(stock_factory):
    return stock_factory("tiny", num_layers=LAYERS, attention="sdpa")


@pytest.fixture(scope="module")
def batch(stock, batch_factory):
    return batch_factory(stock)


def visor_without(stock, blind: list[int]) -> VisorForConditionalGeneration:
    """The VISOR model with no CA block whose only configuration runs every layer outside `blind` as SA."""
    keep = [layer for layer in range(LAYERS) if layer not in blind]
    config = VisorConfig.from_stock_config(stock.config, cross_attention_layers=[],
                                           self_attention_layers=list(range(LAYERS)), configurations=[keep],
                                           position_encoding=False)
    return VisorForConditionalGeneration.from_stock(stock, config).eval()


@torch.no_grad()
def test_measuring_does_not_change_outputs(stock, batch):
    valid = batch["attention_mask"].bool()
    reference = stock(**batch).logits[valid]
    seen = {}
    measured = probe(stock, measure=[1, 4], on_weights=lambda layer, weights: seen.__setitem__(layer, weights))
    probed = measured(**batch).logits[valid]
    torch.testing.assert_close(probed, reference, atol=1e-5, rtol=0)
    assert set(seen) == {1, 4} and seen[1].shape[-1] == batch["input_ids"].shape[1]
    assert stock.model.language_model.config._attn_implementation == "sdpa"  # restored after each measured layer


@torch.no_grad()
@pytest.mark.parametrize("blind", [[2, 3], [0], [5], list(range(LAYERS))])
def test_blind_layers_are_visor_text_layers(stock, batch, blind):
    visor = visor_without(stock, blind)
    valid = batch["attention_mask"].bool()
    probed = probe(stock, blind=blind)(**batch).logits[valid]
    torch.testing.assert_close(probed, visor(**batch).logits[valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_blind_layers_hold_while_decoding(stock, batch):
    """Generated tokens must not see image keys in blind layers either (VISOR keeps no visual cache there)."""
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = visor_without(stock, [1, 2]).generate(**batch, configuration=0, **options)
    probed = probe(stock, blind=[1, 2]).generate(**batch, **options)
    plain = stock.generate(**batch, **options)
    assert torch.equal(probed, expected)
    assert not torch.equal(plain, expected)  # else this test proves nothing


@torch.no_grad()
def test_read_layers_keep_image_tokens_but_let_text_read_them(stock, batch):
    reading = probe(stock, read=[2])
    layers = reading.text_stack.layers
    inputs = {}  # what enters layers 2 and 3 (layer 2 itself runs on the text stream alone)
    layers[1].register_forward_hook(lambda module, args, output: inputs.__setitem__(2, output))
    layers[3].register_forward_pre_hook(lambda module, args: inputs.__setitem__(3, args[0]))
    read = reading(**batch).logits
    blind = probe(stock, blind=[2])(**batch).logits
    visual = batch["input_ids"] == stock.config.image_token_id
    assert torch.equal(inputs[3][visual], inputs[2][visual])  # layer 2 left the image tokens as they were
    valid = batch["attention_mask"].bool() & ~visual
    assert (read - blind)[valid].abs().max() > 1e-3  # but its text read them (a blind layer 2 differs)


def test_bad_layer_sets_raise(stock):
    with pytest.raises(ValueError, match="out of range"):
        probe(stock, blind=[LAYERS])
    with pytest.raises(ValueError, match="both read and blind"):
        probe(stock, blind=[1], read=[1])
    with pytest.raises(ValueError, match="on_weights"):
        probe(stock, measure=[1])
    with pytest.raises(ValueError, match="must run over every token"):
        probe(stock, blind=[1], measure=[1], on_weights=lambda layer, weights: None)

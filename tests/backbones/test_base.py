"""The text-model contract every family's adapter checks (`Backbone.check_text_config`, `check_text_model`): each
tiny preset meets it, and a text model that breaks it is refused by name before anything runs."""

from __future__ import annotations

import pytest
from torch import nn

from visor import presets
from visor.backbones import backbone_for, family

TINY = [name for name in presets.PRESETS if name.startswith("tiny")]


def _visor_model(config):
    visor_class = family(config).VISOR_MODEL
    return visor_class(visor_class.config_class.from_stock_config(config))


@pytest.mark.parametrize("preset", TINY)
def test_every_tiny_preset_meets_the_contract(preset):
    config = presets.PRESETS[preset]()
    model = _visor_model(config)  # both checks run here
    backbone_for(config).check_text_model(model)


@pytest.mark.parametrize("change, message", [
    (lambda text: setattr(text, "layer_types", ["full_attention", "sliding_attention"] * (text.num_hidden_layers // 2)),
     r"\['sliding_attention'\] layers"),
    (lambda text: setattr(text, "use_sliding_window", True), "sliding-window"),
    (lambda text: text.rope_parameters.update(partial_rotary_factor=0.5), "rotates 0.5 of it"),
])
def test_a_text_config_outside_the_contract_is_refused_by_name(change, message):
    config = presets.tiny()
    change(config.text_config)
    with pytest.raises(ValueError, match=message):
        backbone_for(config)


def _layer_change(name):
    def extra_norm(layer):
        layer.pre_feedforward_layernorm = nn.Identity()

    def layer_norm(layer):
        layer.input_layernorm = nn.LayerNorm(layer.input_layernorm.weight.shape[0])

    def no_projection(layer):
        del layer.self_attn.o_proj

    return {"extra_norm": (extra_norm, r"holds \['pre_feedforward_layernorm'\]"),
            "layer_norm": (layer_norm, "input_layernorm is a LayerNorm, not an RMSNorm"),
            "no_projection": (no_projection, "no linear o_proj")}[name]


@pytest.mark.parametrize("name", ["extra_norm", "layer_norm", "no_projection"])
def test_text_modules_outside_the_contract_are_refused_by_name(name):
    config = presets.tiny()
    model = _visor_model(config)
    change, message = _layer_change(name)
    change(backbone_for(config).language_model(model).layers[1])
    with pytest.raises(ValueError, match=f"text layer 1 .*{message}"):
        backbone_for(config).check_text_model(model)


def test_visor_and_pruned_models_check_their_text_modules(monkeypatch):
    from visor.backbones.base import Backbone
    from visor.reduction.pruned import PruningPlan, pruned

    checked = []
    monkeypatch.setattr(Backbone, "check_text_model", lambda self, model: checked.append(type(model).__name__))
    config = presets.tiny()
    stock = family(config).BACKBONE.stock_model_class(config).eval()
    _visor_model(config)
    pruned(stock, PruningPlan({}))
    assert checked == ["VisorForConditionalGeneration", "PrunedLlavaOnevisionForConditionalGeneration"]

"""`VisorConfig`: the default schedule, validation with clear errors, and a save/load round trip."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from visor import VisorConfig, presets


def config_with(num_layers=24, **options) -> VisorConfig:
    return VisorConfig.from_stock_config(presets.tiny(num_layers), **options)


def test_defaults_for_24_layers_match_the_paper():
    """L/3 = 8 CA layers and 8 SA candidates, disjoint; nested configurations from CA-only to all 8."""
    config = config_with(24)
    cross, candidates = config.cross_attention_layers, config.self_attention_layers
    assert len(cross) == 8 and len(candidates) == 8
    assert not set(cross) & set(candidates)
    assert cross == sorted(cross) and all(0 <= layer < 24 for layer in cross + candidates)
    assert config.configurations == [candidates[:count] for count in range(9)]
    assert config.router_layer <= min(candidates)
    assert config.router_layer == config.first_optional_layer
    assert config.largest_configuration == 8
    assert config.router_mode == "softmax"  # the paper's router, the default everywhere


@pytest.mark.parametrize("num_layers", [2, 4, 6, 28, 32])
def test_defaults_are_valid_for_other_depths(num_layers):
    config = config_with(num_layers)
    assert config.cross_attention_layers and not set(config.cross_attention_layers) & set(config.self_attention_layers)
    assert config.configurations[0] == []


def test_dense_config_is_every_layer_sa_and_no_ca():
    config = VisorConfig.dense(presets.tiny(6))
    assert config.cross_attention_layers == []
    assert config.configurations == [list(range(6))]
    assert config.first_optional_layer is None


def test_from_stock_config_keeps_the_stock_config():
    llava = presets.tiny_llama(6)
    config = VisorConfig.from_stock_config(llava)
    assert config.text_config.model_type == "llama"
    assert config.image_token_id == llava.image_token_id
    assert config.image_grid_pinpoints == llava.image_grid_pinpoints
    assert config.vision_config.patch_size == llava.vision_config.patch_size


def test_overlap_is_allowed_only_when_asked_for():
    config = config_with(6, cross_attention_layers=[0, 3], self_attention_layers=[3, 4], allow_cross_and_self_attention=True)
    assert config.configurations == [[], [3], [3, 4]]


INVALID = {
    "ca-out-of-range": (dict(cross_attention_layers=[0, 24]), r"cross_attention_layers \[24\] out of range"),
    "sa-negative": (dict(self_attention_layers=[-1]), r"self_attention_layers \[-1\] out of range"),
    "ca-duplicates": (dict(cross_attention_layers=[3, 3]), "cross_attention_layers has duplicates"),
    "sa-duplicates": (dict(self_attention_layers=[4, 4]), "self_attention_layers has duplicates"),
    "ca-sa-overlap": (dict(cross_attention_layers=[0, 4], self_attention_layers=[4, 5]),
                      r"layers \[4\] are both cross-attention and self-attention"),
    "non-candidate": (dict(self_attention_layers=[1, 4], configurations=[[], [1, 7]]),
                      r"configuration 1 uses layers \[7\] that are not self_attention_layers"),
    "configuration-duplicates": (dict(self_attention_layers=[1, 4], configurations=[[1, 1]]), "duplicate layers"),
    "repeated-configuration": (dict(self_attention_layers=[1, 4], configurations=[[], [1], [1]]),
                               "configuration 2 repeats configuration 1"),
    "unordered-configurations": (dict(self_attention_layers=[1, 4], configurations=[[1, 4], [], [1]]),
                                 "from fewest to most self-attention layers"),
    "router-mode": (dict(router_mode="argmax"), "router mode must be one of"),
    "router-after-first-optional": (dict(self_attention_layers=[1, 4], router_layer=2),
                                    "router_layer 2 comes after the first optional self-attention layer 1"),
    "router-out-of-range": (dict(self_attention_layers=[1, 4], configurations=[[1, 4]], router_layer=30),
                            "router_layer 30 out of range"),
    "empty-configurations": (dict(configurations=[]), "configurations is empty"),
    "even-cpe-kernel": (dict(position_encoding_kernel=6), "position_encoding_kernel must be a positive odd number"),
    "ca-kv-heads": (dict(cross_attention_key_value_heads=3), "cross_attention_key_value_heads must be a positive divisor"),
    "ca-kv-heads-zero": (dict(cross_attention_key_value_heads=0), "cross_attention_key_value_heads must be a positive divisor"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_schedules_are_clear_value_errors(case):
    options, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        config_with(24, **options)


def test_too_shallow_text_model_is_rejected():
    with pytest.raises(ValueError, match="at least 2 layers"):
        config_with(1)


def test_save_and_load_round_trip(tmp_path):
    config = config_with(
        12, cross_attention_layers=[0, 5], self_attention_layers=[2, 7, 9],
        configurations=[[], [2], [2, 9], [2, 7, 9]], cross_attention_mlp=True, position_encoding_kernel=5,
    )
    config.save_pretrained(tmp_path)
    for loaded in (VisorConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, VisorConfig)
        assert loaded.cross_attention_layers == [0, 5]
        assert loaded.self_attention_layers == [2, 7, 9]
        assert loaded.configurations == [[], [2], [2, 9], [2, 7, 9]]
        assert loaded.router_layer == config.router_layer == 2
        assert loaded.cross_attention_mlp and loaded.position_encoding_kernel == 5
        assert loaded.text_config.to_dict() == config.text_config.to_dict()
        saved, original = loaded.to_dict(), config.to_dict()
        saved.pop("_name_or_path"), original.pop("_name_or_path")
        assert saved == original

"""Backbone adapters: what differs between model families, behind one object, so that VISOR's layer engine, the FLOP
counter and the token-reduction baselines are written once. Each family is one module here that defines its
`Backbone` and its VISOR classes; `FAMILIES` maps its configs' `model_type`s (stock and VISOR) to that module,
imported when first asked for."""

from __future__ import annotations

from importlib import import_module

from visor.backbones.base import Backbone, ImageTokens

FAMILIES = {
    "llava_onevision": "visor.backbones.llava_onevision",
    "visor": "visor.backbones.llava_onevision",
    "qwen2_vl": "visor.backbones.qwen2_vl",
    "visor_qwen2_vl": "visor.backbones.qwen2_vl",
    "qwen2_5_vl": "visor.backbones.qwen2_5_vl",
    "visor_qwen2_5_vl": "visor.backbones.qwen2_5_vl",
    "qwen3_vl": "visor.backbones.qwen3_vl",
    "visor_qwen3_vl": "visor.backbones.qwen3_vl",
    "internvl": "visor.backbones.internvl",
    "visor_internvl": "visor.backbones.internvl",
}


def family(config):
    """The adapter module of `config`'s family (stock or VISOR config); a ValueError naming the families otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = sorted({name for name in FAMILIES if not name.startswith("visor")})
        raise ValueError(f"no VISOR backbone for model type {model_type!r}; supported: {', '.join(supported)}")
    return import_module(FAMILIES[model_type])


def backbone_for(config) -> Backbone:
    """The `Backbone` of `config`'s family, for this config."""
    return family(config).BACKBONE(config)


def checkpoint_config(path):
    """The config of a local checkpoint folder (stock or VISOR) of a supported family; ValueError otherwise."""
    from types import SimpleNamespace

    from visor.modeling.visor import check_checkpoint_folder

    model_type = check_checkpoint_folder(path).get("model_type")
    try:
        module = family(SimpleNamespace(model_type=model_type))
    except ValueError as error:
        raise ValueError(f"checkpoint {path}: {error}") from None
    model_class = module.VISOR_MODEL if model_type.startswith("visor") else module.BACKBONE.stock_model_class
    return model_class.config_class.from_pretrained(str(path), local_files_only=True)


__all__ = ["FAMILIES", "Backbone", "ImageTokens", "backbone_for", "checkpoint_config", "family"]

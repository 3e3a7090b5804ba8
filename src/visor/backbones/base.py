"""`Backbone`: what VISOR's engine, the FLOP counter and the baselines ask of a model family.

An adapter is built from a (stock or VISOR) config of its family. Model-side methods take the model they are
about; geometry and cost methods need only the config, so FLOPs are counted without building a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ImageTokens(NamedTuple):
    crops: int  # image pieces through the vision tower
    visual_tokens: int  # tokens the language model sees for the image


class Backbone:
    """One model family; a subclass defines every method below."""

    stock_model_class: type  # the family's transformers class
    image_inputs: tuple[str, ...]  # the stock forward's image arguments besides `pixel_values`

    def __init__(self, config):
        self.config = config

    def language_model(self, model) -> nn.Module:
        """The text stack: `embed_tokens`, `layers` (the stock decoder layers), `rotary_emb` and `norm`."""
        raise NotImplementedError

    def position_ids(self, input_ids, attention_mask, past_length: int, **image_inputs) -> torch.Tensor:
        """Rotary positions of `input_ids` (B, S) after `past_length` cached positions, as the stock model
        computes them: (B, S), or (sections, B, S) for multi-axis rotary positions."""
        raise NotImplementedError

    def select_image_inputs(self, **arguments) -> dict:
        """The image arguments of a forward call that this family reads (`pixel_values` and `image_inputs`);
        one it does not read, given anyway, is an error rather than silently ignored."""
        names = ("pixel_values", *self.image_inputs)
        stray = sorted(name for name, value in arguments.items() if value is not None and name not in names)
        if stray:
            raise ValueError(f"{type(self).__name__} models take no {', '.join(stray)}")
        return {name: arguments.get(name) for name in names}

    def encode_images(self, model, num_image_tokens: int, **image_inputs) -> list[torch.Tensor]:
        """The stock vision tower, projector and packing: one (n_i, d) tensor per image, in prompt order; a
        ValueError names missing or malformed inputs (`num_image_tokens`: the prompt's, for the message)."""
        raise NotImplementedError

    def image_tokens(self, image_size: tuple[int, int]) -> ImageTokens:
        """Crops and visual tokens of one (height, width) image, as the stock model computes them."""
        raise NotImplementedError

    def largest_image_size(self) -> tuple[int, int]:
        """The (height, width) of the largest image the family's processor makes (a reference prompt)."""
        raise NotImplementedError

    def vision_flops(self, crops: int) -> dict[str, int]:
        """FLOPs of the vision tower and the projector over `crops` crops, by part (`visor.flops` conventions)."""
        raise NotImplementedError

    def vision_tower(self, model) -> nn.Module:
        raise NotImplementedError

    def vision_layers(self, model) -> nn.ModuleList:
        """The vision encoder's layers, whose attention pre-LLM reductions read."""
        raise NotImplementedError

    def feature_layer(self) -> int:
        """Index into `vision_layers` of the layer whose output the projector reads (the last one if several)."""
        raise NotImplementedError

"""Methods that reduce visual tokens before the language model: a shorter prompt, then the model as it is.

A `VisualReducer` turns each image's packed features into fewer tokens (pooling, VisionZip, HiRED …) and knows,
from the image size alone, how many it keeps. `PreLLMReduced` rebuilds every prompt with that many `<image>`
placeholders (left-padded again, as generation needs) and runs the base model on it: the stock model through
`inputs_embeds`, VISOR through `image_features=` (its CPE then runs on the reduced tokens). As in the reference
implementations, the shorter prompt gets contiguous positions. The KV cache is the base model's own, built from
the reduced prompt, so decoding is exactly the base model's.
"""

from __future__ import annotations

from typing import Protocol

import torch

from visor.backbones import backbone_for
from visor.config import Schedule
from visor.flops import image_tokens, llm_prefill_flops, prompt_token_counts
from visor.modeling.visor import VisorModel


class VisualReducer(Protocol):
    def features(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """One (kept_i, d) projected tensor per image, in the order the LLM reads them."""

    def kept_tokens(self, config, image_size: tuple[int, int]) -> int:
        """Tokens `features` keeps for one image of this size (what the FLOP count uses)."""

    def vision_overhead_flops(self, config, image_size: tuple[int, int]) -> int:
        """FLOPs the reducer adds on the vision side for one image (scores, similarities), outside the LLM."""


def supports(config) -> bool:
    """Pre-LLM reducers cut LLaVA-OneVision's packed grids (base view, hi-res grid, newlines) and score with
    SigLIP's attention: only a family whose adapter has those grids."""
    return hasattr(backbone_for(config), "packed_grid")


def check_backbone(config) -> None:
    """A ValueError naming `config`'s family when the pre-LLM reducers do not apply to it (`supports`)."""
    if not supports(config):
        backbone = backbone_for(config)
        raise ValueError(f"pre-LLM reductions (pool, VisionZip, HiRED) read LLaVA-OneVision's anyres grids and "
                         f"SigLIP's attention; they are not ported to {type(backbone).__name__} models")


class PreLLMReduced:
    """`base` (a stock model or VISOR at `configuration`) reading the images through `reducer`."""

    check_family = staticmethod(check_backbone)  # refuses a family the reducer cannot read, before any work

    def __init__(self, base, reducer: VisualReducer, configuration: int | None = None):
        self.check_family(base.config)
        self.base, self.reducer = base, reducer
        self.is_visor = isinstance(base, VisorModel)
        if configuration is not None and not self.is_visor:
            raise ValueError("a configuration needs a VISOR model; the stock model has only one")
        self.configuration = base.config.largest_configuration if self.is_visor and configuration is None else configuration
        self.schedule = base_schedule(base.config, self.configuration)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def training(self) -> bool:
        return self.base.training

    def train(self, mode: bool = True) -> PreLLMReduced:
        """Train or eval mode, as a module's: the base model's (the reducer has no state)."""
        self.base.train(mode)
        return self

    def eval(self) -> PreLLMReduced:
        return self.train(False)

    def __repr__(self) -> str:
        return f"PreLLMReduced({type(self.base).__name__}, {self.reducer!r}, configuration={self.configuration})"

    # ---- the reduced prompt --------------------------------------------------------------------------------
    def model_inputs(self, input_ids, attention_mask, pixel_values, image_sizes, labels=None,
                     batch_num_images=None, pixel_values_videos=None) -> dict:
        """Arguments for the base model: the prompt with each image's placeholders cut to the kept count (and
        `labels`, when given, cut alike). Gradients reach the vision side only while the base model trains."""
        config = self.config
        if pixel_values_videos is not None:
            raise ValueError("pre-LLM image reductions read one image per sample, not videos (the video reductions "
                             "are visor.reduction.prellm_video's)")
        if batch_num_images is not None and bool((batch_num_images != 1).any()):
            raise ValueError(f"pre-LLM reductions read one image per sample; got {batch_num_images.tolist()} images")
        image = input_ids == config.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        expected = _per_sample(image_sizes, config, lambda config, size: image_tokens(config, size).visual_tokens)
        if image.sum(dim=1).tolist() != expected:
            raise ValueError(
                f"each sample must hold one image whose <image> tokens match its size: got "
                f"{image.sum(dim=1).tolist()} tokens for images of {expected} tokens"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.base.training):
            features = self.reducer.features(self.base, pixel_values, image_sizes)
        counts = torch.tensor([len(image) for image in features], device=input_ids.device)
        # Keep the first `counts[b]` placeholders of sample b (they are all the same id) and every real text token.
        rank = image.long().cumsum(dim=1)
        keep = attention_mask.bool() & (~image | (rank <= counts[:, None]))
        return self.base_inputs(input_ids, attention_mask, keep, features, labels)

    def base_inputs(self, input_ids, attention_mask, keep, features: list[torch.Tensor], labels=None) -> dict:
        """The base model's arguments for the prompt's `keep` tokens (labels cut alike), left-padded again, whose
        `<image>` slots (all the visual slots) take `features` in prompt order."""
        config = self.config
        packed_labels = {} if labels is None else dict(labels=_left_pack(labels, keep, -100)[0])
        input_ids, attention_mask = _left_pack(input_ids, keep, config.text_config.pad_token_id)
        if self.is_visor:
            return dict(input_ids=input_ids, attention_mask=attention_mask, image_features=features,
                        configuration=self.configuration, **packed_labels)
        embeds = self.base.get_input_embeddings()(input_ids)
        slots = (input_ids == config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(slots, torch.cat(features).to(embeds.dtype))
        return dict(inputs_embeds=embeds, attention_mask=attention_mask, **packed_labels)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, **options):
        """The base model's output on the reduced prompt (its logits are over the reduced positions)."""
        return self.base(**self.model_inputs(input_ids, attention_mask, pixel_values, image_sizes,
                                             batch_num_images=batch_num_images,
                                             pixel_values_videos=pixel_values_videos), **options)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, **options):
        """The base model's `generate` on the reduced prompt; sequences start with the original `input_ids`."""
        inputs = self.model_inputs(input_ids, attention_mask, pixel_values, image_sizes,
                                   batch_num_images=batch_num_images, pixel_values_videos=pixel_values_videos)
        output = self.base.generate(**inputs, **options)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        returned_prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        sequences = torch.cat([input_ids, sequences[:, returned_prompt:]], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    # ---- cost ---------------------------------------------------------------------------------------------------
    def visual_tokens(self, inputs: dict) -> torch.Tensor:
        """(B,) visual tokens each sample sends to the LLM."""
        return torch.tensor(_per_sample(inputs["image_sizes"], self.config, self.reducer.kept_tokens))

    def vision_overhead_flops(self, inputs: dict) -> torch.Tensor:
        """(B,) FLOPs the reduction itself adds before the LLM (not part of the LLM prefill headline)."""
        return torch.tensor(_per_sample(inputs["image_sizes"], self.config, self.reducer.vision_overhead_flops))

    def prefill_flops(self, inputs: dict) -> torch.Tensor:
        return reduced_prefill_flops(self.config, self.reducer, inputs, self.schedule)


def base_schedule(config, configuration: int | None) -> Schedule:
    """What the base model runs: VISOR at `configuration`, or the stock model (`configuration` None)."""
    return Schedule.full(config) if configuration is None else Schedule.of(config, configuration)


def reduced_prefill_flops(config, reducer: VisualReducer, inputs: dict, schedule: Schedule) -> torch.Tensor:
    """(B,) LLM prefill FLOPs of a prompt batch whose images go through `reducer`, the base model at `schedule`."""
    _, text = prompt_token_counts(config, inputs)
    visual = _per_sample(inputs["image_sizes"], config, reducer.kept_tokens)
    return torch.tensor([llm_prefill_flops(config, count, text_tokens, schedule).total
                         for count, text_tokens in zip(visual, text.tolist())])


def _per_sample(image_sizes: torch.Tensor, config, count) -> list[int]:
    return [count(config, tuple(size)) for size in image_sizes.tolist()]


def _left_pack(input_ids: torch.Tensor, keep: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens of each row moved to the right end (original order), padded on the left."""
    length = int(keep.sum(dim=1).max())
    order = keep.long().argsort(dim=1, stable=True)[:, -length:]  # dropped first, kept last, each in order
    mask = keep.gather(1, order)
    return input_ids.gather(1, order).masked_fill(~mask, pad_id), mask.long()

"""How vLLM turns a request's prompt and images into a VISOR model's inputs.

vLLM serves VISOR as an encoder-decoder model (`visor.integrations.vllm.model` says why). The *encoder* prompt is
the images' visual tokens alone (vLLM's scheduler runs encoder inputs that start the encoder prompt), which tells
vLLM how many visual keys and values to make room for. The *decoder* prompt is the prompt's text without its
image tokens (Qwen-VL's vision start and end tokens stay), whose tokens are the ones every layer caches. Where each
image sat in the prompt travels with it as `image_offset` (text tokens before it), which the model's positions are
computed from. Pixels come from the checkpoint's own image processor, as `VisorProcessor` makes them
(`visor.data.processor`, no torchvision), so vLLM and `VisorForConditionalGeneration` see identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    DictEmbeddingItems, ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems, MultiModalDataParser,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor, PromptReplacement, PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs

from visor.backbones import backbone_for
from visor.data.processor import AnyresImages, GridImages, image_side, load_image, load_image_processor

class GridEmbeddingsParser(MultiModalDataParser):
    """Precomputed features of a Qwen-VL image come with its patch grid (`{"image_embeds": (n, d),
    "image_grid_thw": (1, 3)}`): its positions depend on the grid, not only on the token count."""

    def __init__(self, merge_size: int, **kwargs):
        super().__init__(**kwargs)
        self.merge_size = merge_size

    def _parse_image_data(self, data):
        if not isinstance(data, dict):
            return super()._parse_image_data(data)

        def fields(inputs):
            tokens = inputs["image_grid_thw"].prod(-1) // self.merge_size**2
            return dict(image_embeds=MultiModalFieldConfig.flat_from_sizes("image", tokens),
                        image_grid_thw=MultiModalFieldConfig.batched("image"))

        return DictEmbeddingItems(data, modality="image", required_fields={"image_embeds", "image_grid_thw"},
                                  fields_factory=fields)


class VisorProcessingInfo(BaseProcessingInfo):
    @cached_property
    def backbone(self):
        return backbone_for(self.get_hf_config())

    def get_data_parser(self) -> MultiModalDataParser:
        config = self.get_hf_config()
        if "image_grid_thw" not in self.backbone.image_inputs:
            return super().get_data_parser()
        return GridEmbeddingsParser(config.vision_config.spatial_merge_size,
                                    expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    @cached_property
    def images(self) -> AnyresImages | GridImages:
        """The checkpoint's own image processor, as `VisorProcessor` uses it."""
        folder = self.ctx.model_config.model
        return image_side(self.backbone)(self.backbone, load_image_processor(folder, self.backbone), str(folder))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def visual_tokens(self, width: int, height: int, images_in_prompt: int = 1) -> int:
        return self.images.token_count((height, width), images_in_prompt)

    def largest_image(self) -> tuple[int, int]:
        height, width = self.images.largest_image_size()
        return width, height

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.visual_tokens(*self.largest_image())}


class VisorDummyInputsBuilder(BaseDummyInputsBuilder[VisorProcessingInfo]):
    """The largest image the processor makes, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        tokenizer = self.info.get_tokenizer()
        return tokenizer.convert_ids_to_tokens(self.info.get_hf_config().image_token_id) * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        width, height = self.info.largest_image()
        overrides = (mm_options or {}).get("image") if isinstance(mm_options, Mapping) else None
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class VisorMultiModalProcessor(EncDecMultiModalProcessor[VisorProcessingInfo]):
    skip_decoder_start_token = True  # the decoder prompt is the model's own prompt text, not a fresh sequence

    @property
    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    def apply(self, inputs: ProcessorInputs, timing_ctx):
        offsets = [index - count for count, index in enumerate(
            index for index, token in enumerate(inputs.prompt) if token == self.image_token_id)]
        kwargs = {**inputs.hf_processor_mm_kwargs, "image_offsets": offsets}
        return super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [self.image_token_id] * mm_items.get_count("image", strict=False)  # each becomes its visual tokens

    def create_decoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [token for token in prompt if token != self.image_token_id]

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = [load_image(image, min_side=self.info.images.min_side) for image in hf_data.get("images", [])]
        return BatchFeature(self.info.images([images]) if images else {})

    def _postprocess_hf_mm_data(self, mm_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object],
                                processed_data: BatchFeature) -> BatchFeature:
        """Each image's place in the prompt, next to its pixels or its precomputed features (`image_embeds`)."""
        images = next((processed_data[name] for name in ("image_sizes", "image_grid_thw", "image_embeds")
                       if name in processed_data), None)
        offsets = hf_processor_mm_kwargs.get("image_offsets", [])
        if images is not None:
            if len(offsets) != len(images):
                raise ValueError(f"the prompt has {len(offsets)} image placeholders for {len(images)} images")
            processed_data["image_offset"] = torch.tensor(offsets)
            processed_data["images_in_prompt"] = torch.full((len(offsets),), len(offsets))
            processed_data.pop("batch_num_images", None)  # per prompt; vLLM's fields are per image
        return processed_data

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(image_sizes=MultiModalFieldConfig.batched("image"),
                      image_embeds=MultiModalFieldConfig.batched("image"),
                      image_offset=MultiModalFieldConfig.batched("image"),
                      images_in_prompt=MultiModalFieldConfig.batched("image"))
        if "image_grid_thw" in hf_inputs:  # Qwen-VL: every image's patches (or features) in one flat tensor
            patches = hf_inputs["image_grid_thw"].prod(-1)
            tokens = patches // self.info.images.image_processor.merge_size**2
            fields |= dict(pixel_values=MultiModalFieldConfig.flat_from_sizes("image", patches),
                           image_embeds=MultiModalFieldConfig.flat_from_sizes("image", tokens),
                           image_grid_thw=MultiModalFieldConfig.batched("image"))
        else:
            fields["pixel_values"] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        def visual_tokens(item: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, DictEmbeddingItems, ImageProcessorItems))
            if isinstance(images, DictEmbeddingItems):
                grid = images.get(item)["image_grid_thw"].reshape(-1, 3)[0]
                return [self.image_token_id] * (int(grid.prod()) // self.info.images.image_processor.merge_size**2)
            if isinstance(images, ImageEmbeddingItems):
                return [self.image_token_id] * images.get_feature_size(item)
            size = images.get_image_size(item)
            return [self.image_token_id] * self.info.visual_tokens(size.width, size.height, images.get_count())

        return [PromptReplacement(modality="image", target=[self.image_token_id], replacement=visual_tokens)]

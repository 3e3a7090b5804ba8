"""How vLLM turns a request's prompt and images (or video) into a VISOR model's inputs.

vLLM serves VISOR as an encoder-decoder model (`visor.integrations.vllm.model` says why). The *encoder* prompt is
the images' visual tokens alone (vLLM's scheduler runs encoder inputs that start the encoder prompt), which tells
vLLM how many visual keys and values to make room for. The *decoder* prompt is the prompt's text without its
image tokens (Qwen-VL's vision start and end tokens stay), whose tokens are the ones every layer caches. Where each
image sat in the prompt travels with it as `image_offset` (text tokens before it), which the model's positions are
computed from. Pixels come from the checkpoint's own image processor, as `VisorProcessor` makes them
(`visor.data.processor`, no torchvision), so vLLM and `VisorForConditionalGeneration` see identical inputs.

A LLaVA-OV video (`multi_modal_data={"video": frames}`, a list of PIL frames or a (frames, H, W, 3) uint8 array, as
vLLM's own LLaVA-OV takes it) is a visual item like an image: its `<video>` token becomes its visual tokens in the
encoder prompt, its place travels as `video_offset`. Its frames are sampled and prepared by the checkpoint's video
settings, as `VisorProcessor(videos=...)` prepares them (`visor.data.processor.VideoFrames`: a clip longer than the
settings' `num_frames` is sampled down to it, each frame resized and normalised as
`video_preprocessor_config.json` says); vLLM's stock LLaVA-OV path instead keeps every frame it is given (the stock
video processor's `do_sample_frames` is off) and needs torchvision. An engine takes one modality
(`engine_arguments(..., modality=...)` says why).
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
    VideoProcessorItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor, PromptReplacement, PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs

from visor.backbones import backbone_for
from visor.data.processor import (
    AnyresImages, GridImages, VideoFrames, image_side, load_image, load_image_processor, video_side,
)

MODALITIES = ("image", "video")

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

    @cached_property
    def videos(self) -> VideoFrames | None:
        """LLaVA-OV's video side of `VisorProcessor`, with the checkpoint's video settings (None: this family's
        videos are not served)."""
        if not self.backbone.video_inputs or video_side(self.backbone) is not VideoFrames:
            return None
        folder = str(self.ctx.model_config.model)
        return VideoFrames(self.backbone, VideoFrames.load_settings(folder, self.backbone, self.images.image_processor))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None} | ({"video": None} if self.videos is not None else {})

    def token_id(self, modality: str) -> int:
        config = self.get_hf_config()
        return config.image_token_id if modality == "image" else config.video_token_id

    def visual_tokens(self, width: int, height: int, images_in_prompt: int = 1) -> int:
        return self.images.token_count((height, width), images_in_prompt)

    def largest_image(self) -> tuple[int, int]:
        height, width = self.images.largest_image_size()
        return width, height

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        tokens = {"image": self.visual_tokens(*self.largest_image())}
        if self.videos is not None:
            tokens["video"] = self.backbone.video_tokens(self.videos.settings.num_frames).visual_tokens
        return tokens


class VisorDummyInputsBuilder(BaseDummyInputsBuilder[VisorProcessingInfo]):
    """The largest image (and video: the settings' frames) the processor makes, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        tokenizer = self.info.get_tokenizer()
        return "".join(tokenizer.convert_ids_to_tokens(self.info.token_id(modality)) * mm_counts.get(modality, 0)
                       for modality in MODALITIES)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        width, height = self.info.largest_image()
        options = mm_options if isinstance(mm_options, Mapping) else {}
        data = {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                                overrides=options.get("image"))}
        if self.info.videos is not None:
            side = self.info.get_hf_config().vision_config.image_size
            data["video"] = self._get_dummy_videos(width=side, height=side,
                                                   num_frames=self.info.videos.settings.num_frames,
                                                   num_videos=mm_counts.get("video", 0),
                                                   overrides=options.get("video"))
        return data


class VisorMultiModalProcessor(EncDecMultiModalProcessor[VisorProcessingInfo]):
    skip_decoder_start_token = True  # the decoder prompt is the model's own prompt text, not a fresh sequence

    @property
    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    @property
    def visual_token_ids(self) -> set[int]:
        """The placeholders of the modalities served: each item's tokens leave the decoder prompt."""
        return {self.info.token_id(modality) for modality in self.info.get_supported_mm_limits()}

    def apply(self, inputs: ProcessorInputs, timing_ctx):
        placeholders = [(index, token) for index, token in enumerate(inputs.prompt) if token in self.visual_token_ids]
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        for modality in MODALITIES:  # text tokens before each item
            kwargs[f"{modality}_offsets"] = [index - count for count, (index, token) in enumerate(placeholders)
                                             if token == self.info.token_id(modality)]
        return super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [self.info.token_id(modality) for modality in MODALITIES  # each becomes its visual tokens
                for _ in range(mm_items.get_count(modality, strict=False))]

    def create_decoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [token for token in prompt if token not in self.visual_token_ids]

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = [load_image(image, min_side=self.info.images.min_side) for image in hf_data.get("images", [])]
        outputs = self.info.images([images]) if images else {}
        videos = [self.info.videos.load(list(video_frames(video))) for video in hf_data.get("videos", [])]
        if videos:
            outputs |= self.info.videos([videos])
        return BatchFeature(outputs)

    def _postprocess_hf_mm_data(self, mm_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object],
                                processed_data: BatchFeature) -> BatchFeature:
        """Each image's (video's) place in the prompt, next to its pixels or its precomputed features
        (`image_embeds`)."""
        images = next((processed_data[name] for name in ("image_sizes", "image_grid_thw", "image_embeds")
                       if name in processed_data), None)
        offsets = hf_processor_mm_kwargs.get("image_offsets", [])
        if images is not None:
            if len(offsets) != len(images):
                raise ValueError(f"the prompt has {len(offsets)} image placeholders for {len(images)} images")
            processed_data["image_offset"] = torch.tensor(offsets)
            processed_data["images_in_prompt"] = torch.full((len(offsets),), len(offsets))
            processed_data.pop("batch_num_images", None)  # per prompt; vLLM's fields are per image
        if "pixel_values_videos" in processed_data:
            offsets = hf_processor_mm_kwargs.get("video_offsets", [])
            videos = len(processed_data["pixel_values_videos"])
            if len(offsets) != videos:
                raise ValueError(f"the prompt has {len(offsets)} video placeholders for {videos} videos")
            processed_data["video_offset"] = torch.tensor(offsets)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(image_sizes=MultiModalFieldConfig.batched("image"),
                      image_embeds=MultiModalFieldConfig.batched("image"),
                      image_offset=MultiModalFieldConfig.batched("image"),
                      images_in_prompt=MultiModalFieldConfig.batched("image"),
                      pixel_values_videos=MultiModalFieldConfig.batched("video"),
                      video_offset=MultiModalFieldConfig.batched("video"))
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

        def video_tokens(item: int) -> list[int]:
            videos = mm_items.get_items("video", VideoProcessorItems)
            frames = len(self.info.videos.settings.frame_indices(videos.get_num_frames(item)))
            return [self.info.token_id("video")] * self.info.backbone.video_tokens(frames).visual_tokens

        updates = [PromptReplacement(modality="image", target=[self.image_token_id], replacement=visual_tokens)]
        if self.info.videos is not None:
            updates.append(PromptReplacement(modality="video", target=[self.info.token_id("video")],
                                             replacement=video_tokens))
        return updates


def video_frames(video) -> Sequence:
    """A video's frames as vLLM hands them over: (frames, H, W, 3) uint8, as an array or a tensor, maybe with its
    metadata (which frames read as a list carry none, and the sampling does not read)."""
    video = video[0] if isinstance(video, tuple) else video
    return video.numpy() if isinstance(video, torch.Tensor) else video

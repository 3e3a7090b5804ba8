"""(images, conversation) -> model inputs for a supported model family, with the checkpoint's own processor pieces.

What the stock processor of a family would give, piece by piece (`VisorProcessor.from_pretrained(folder)`):

- **pixels** from the family's stock PIL image processor (no torchvision needed), loaded from the folder's
  `preprocessor_config.json`: `LlavaOnevisionImageProcessorPil` (anyres crops, `image_sizes`, `batch_num_images`),
  `Qwen2VLImageProcessorPil` (flattened patches, `image_grid_thw`) or `GotOcr2ImageProcessorPil` (InternVL's
  tiles). A folder without one gets the family's defaults (`Backbone.default_image_processor`), with a warning.
- **the image token** the model config names (`image_token_id`), as the tokenizer spells it (`<image>`,
  `<|image_pad|>`, `<IMG_CONTEXT>` …), expanded to as many copies as the stock processor writes for that image:
  LLaVA-OV's packed token count (`Backbone.image_tokens`), Qwen-VL's merged patches of the grid, InternVL's tiles
  times its tokens per tile.
- **the chat template** of the folder (its `chat_template.json`, else `chat_template.jinja`, else the tokenizer's).
  A template that renders typed content parts (`{"type": "image"}`, `{"type": "text"}`, as the released
  multimodal templates do) gets them; one that renders text only gets the text with the image token in place.
  Qwen-VL's image tokens always sit between the vision start and end tokens, InternVL's between the tokenizer's
  `<img>` and `</img>` (added when a template does not write them).
- **videos** (LLaVA-OV, Qwen2.5-VL and Qwen3-VL; Qwen2-VL and InternVL refuse them): frames read with Pillow
  (`visor.data.frames`, no frame times) and sampled as the stock video processor samples them (LLaVA-OV and
  Qwen2.5-VL uniformly, Qwen2.5-VL every frame unless its settings sample; Qwen3-VL by fps of frames taken as 24 a
  second), prepared with the folder's `video_preprocessor_config.json`, else the image settings with a warning
  (LLaVA-OV: its normalisation at the crop size; the Qwen-VL families: their pixel bounds and normalisation, as
  the stock processor then reads the image config). LLaVA-OV: (videos, frames, 3, crop, crop)
  `pixel_values_videos`, the video token expanded to as many copies as the model computes for that many frames
  (`Backbone.video_tokens`). Qwen2.5-VL and Qwen3-VL: the frames resized as the stock video processor resizes them
  (Qwen2.5-VL each within the pixel bounds, Qwen3-VL all together within them) and prepared by the stock PIL image
  processor, every `temporal_patch_size` frames one temporal patch (the last frame repeated to fill it), flattened
  into `pixel_values_videos` with `video_grid_thw`, `mm_token_type_ids` 2 at the video tokens. Qwen2.5-VL: with
  `second_per_grid_ts` (temporal_patch_size / 24, the stock processor's rate for untimed frames), `<|video_pad|>`
  expanded to the grid's merged patches between the vision start and end tokens; Qwen3-VL: each temporal patch's
  merged patches after its timestamp ("<t seconds>" from the kept frames' indices at 24 a second) between vision
  start and end tokens of their own.

The families' full processors cannot be built without torchvision (their video half), which is why the pieces are
put together here; the tests check the result equals the stock processor's, byte for byte (for videos, the stock
processor's expansion of frames prepared here: its video half needs torchvision; the Qwen-VL families' frame pixels
equal their stock image processor's for a still frame).

VISOR adds only the training side: `labels` are -100 except on every assistant turn (its tokens and the
end-of-sequence token after them). Pass per-pixel `class_maps` to also get `patch_targets` (batch, max_crops,
patches per crop), aligned with `pixel_values`' crops, -100 where there is no target.

In text, `IMAGE_PLACEHOLDER` (`<image>`, LLaVA's data convention) marks where an image goes, whatever the
tokenizer calls its image token; `VIDEO_PLACEHOLDER` (`<video>`) where a video goes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.image_transforms import resize
from transformers.image_utils import ChannelDimension

from visor.backbones import backbone_for
from visor.data.crops import CropLayout
from visor.data.frames import (
    VIDEO_PREPROCESSOR_CONFIG, Clip, GridVideoSettings, TimedGridVideoSettings, VideoLike, VideoSettings,
    check_normalisation, load_frames, load_grid_video_settings, load_video_settings, temporal_patch_times,
)
from visor.data.images import ImageLike, load_image
from visor.data.render import IGNORE_INDEX
from visor.files import read_json, write_json, write_text

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# A folder's chat template, in the order the stock processors read them (the first one found is used).
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


class AnyresImages:
    """LLaVA-OneVision's image inputs: anyres crops (one crop per image when a prompt holds several, as the stock
    model takes them), and patch targets per crop."""

    has_patch_targets = True

    def __init__(self, backbone, image_processor, source: str, tokenizer=None):
        self.backbone, self.image_processor = backbone, image_processor
        config = backbone.config
        self.min_side = config.vision_config.patch_size
        crop = config.vision_config.image_size
        size = {key: image_processor.size.get(key) for key in ("height", "width")}
        _check_setting(source, "size", size, {"height": crop, "width": crop})
        _check_setting(source, "image_grid_pinpoints", [list(p) for p in image_processor.image_grid_pinpoints],
                       [list(p) for p in config.image_grid_pinpoints])

    @cached_property
    def layout(self) -> CropLayout:
        """Where each crop pixel comes from, for patch targets (it needs crops of whole patches: LLaVA-OV's
        released 384-pixel crops of 14-pixel patches have none, and need none)."""
        return CropLayout.from_config(self.backbone.config)

    def frame(self, tokens: list[int], framed: bool) -> list[int]:
        return tokens

    def token_count(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Visual tokens of a (height, width) image in a prompt of `images_in_prompt` images."""
        return self.backbone.image_tokens(image_size, alone=images_in_prompt == 1).visual_tokens

    def largest_image_size(self) -> tuple[int, int]:
        return self.backbone.largest_image_size()

    def __call__(self, rows: list[list[Image.Image]]) -> dict:
        pixels = self.image_processor([row for row in rows if row], return_tensors="pt")
        return {name: pixels[name] for name in ("pixel_values", "image_sizes", "batch_num_images")}

    def prompt_inputs(self, input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> dict:
        return {}

    def patch_targets(self, images: list[Image.Image], class_maps: list[np.ndarray], inputs: dict) -> torch.Tensor:
        """(batch, max_crops, patches per crop) class ids aligned with `pixel_values`' crops, -100 where none."""
        max_crops = inputs["pixel_values"].shape[1]
        out = torch.full((len(images), max_crops, self.layout.side**2), IGNORE_INDEX, dtype=torch.long)
        for i, (image, class_map) in enumerate(zip(images, class_maps)):
            if class_map is None:  # an image without targets (e.g. a real photo in a mixed batch)
                continue
            if class_map.shape != (image.height, image.width):
                raise ValueError(f"class map {i} is {class_map.shape}, its image is {(image.height, image.width)}")
            targets = self.layout.patch_targets(class_map)
            out[i, : len(targets)] = torch.from_numpy(targets)
        return out


class FramedImages:
    """What the families that frame an image's tokens between a start and an end token share (Qwen-VL, InternVL):
    the placeholder, and no patch targets."""

    has_patch_targets = False
    start: int | None
    end: int | None

    def frame(self, tokens: list[int], framed: bool) -> list[int]:
        """An image's (a video's) tokens, between the start and end tokens unless the chat template wrote them
        (`framed`) or there are none."""
        return tokens if framed or self.start is None else [self.start, *tokens, self.end]

    def prompt_inputs(self, input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> dict:
        return {}

    def patch_targets(self, images, class_maps, inputs):
        raise ValueError("patch targets (class_maps) follow LLaVA-OneVision's crops; this model family has none")


class GridImages(FramedImages):
    """The Qwen-VL families' image inputs: each image resized to whole merged patches and flattened into patches,
    with its (t, h, w) patch grid; its tokens sit between the vision start and end tokens."""

    def __init__(self, backbone, image_processor, source: str, tokenizer=None):
        config = backbone.config
        vision = config.vision_config
        self.image_processor = image_processor
        self.min_side = vision.patch_size
        self.start, self.end = config.vision_start_token_id, config.vision_end_token_id
        for field, expected in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                                ("temporal_patch_size", vision.temporal_patch_size)):
            _check_setting(source, field, getattr(image_processor, field), expected)

    def token_count(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Visual tokens of a (height, width) image: its merged patches at the processor's pixel bounds."""
        return self.image_processor.get_number_of_image_patches(*image_size) // self.image_processor.merge_size**2

    def largest_image_size(self) -> tuple[int, int]:
        """The largest square the processor keeps whole: its pixel bound, rounded down to whole merged patches."""
        merged = self.image_processor.patch_size * self.image_processor.merge_size
        side = int(self.image_processor.size["longest_edge"] ** 0.5) // merged * merged
        return side, side

    def __call__(self, rows: list[list[Image.Image]]) -> dict:
        pixels = self.image_processor([image for row in rows for image in row], return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def prompt_inputs(self, input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> dict:
        """The token types that the stock models compute their positions from: 1 at image tokens, 2 at video
        tokens (`video_token_id`: None where the processor prepares no video), as the stock processors write them."""
        types = (input_ids == image_token_id).int()
        if video_token_id is not None:
            types = types + 2 * (input_ids == video_token_id).int()
        return {"mm_token_type_ids": types}


class TiledImages(FramedImages):
    """InternVL's image inputs: each image cut into square tiles (the grid closest to its aspect ratio within the
    processor's tile bounds, then a thumbnail), all images' tiles in one (tiles, 3, side, side) tensor, as the stock
    processor cuts them whatever its `crop_to_patches` says; an image's tokens sit between the tokenizer's start and
    end image tokens (`<img>`, `</img>`; a tokenizer that names none, such as the presets' word tokenizer, gets
    the image tokens alone)."""

    def __init__(self, backbone, image_processor, source: str, tokenizer=None):
        self.backbone, self.image_processor = backbone, image_processor
        self.min_side = backbone.config.vision_config.patch_size[0]
        side = backbone.tile_side
        _check_setting(source, "size", {key: image_processor.size.get(key) for key in ("height", "width")},
                       {"height": side, "width": side})
        start, end = (getattr(tokenizer, f"{name}_image_token_id", None) for name in ("start", "end"))
        self.start, self.end = (start, end) if start is not None and end is not None else (None, None)

    def token_count(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Visual tokens of a (height, width) image: its tiles at the processor's tile bounds, every image tiled."""
        tiles = self.image_processor.get_number_of_image_patches(*image_size, {"crop_to_patches": True})
        return tiles * self.backbone.tokens_per_tile()

    def largest_image_size(self) -> tuple[int, int]:
        return self.backbone.largest_image_within(self.image_processor.min_patches, self.image_processor.max_patches)

    def __call__(self, rows: list[list[Image.Image]]) -> dict:
        pixels = self.image_processor([image for row in rows for image in row], crop_to_patches=True,
                                      return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"]}


def image_side(backbone) -> type:
    """The class that makes `backbone`'s family's image inputs."""
    if "image_grid_thw" in backbone.image_inputs:
        return GridImages
    return TiledImages if hasattr(type(backbone), "tile_side") else AnyresImages


class Videos:
    """What the families' video inputs share: a video's frames read with Pillow (`visor.data.frames.load_frames`)
    and sampled as the settings sample (`frame_indices`: to the call's `num_frames`, else as the checkpoint says),
    kept as a `Clip` (the frames and their indices); a video's tokens, as many video tokens as it counts; the
    settings written back as the checkpoint's `video_preprocessor_config.json`. A subclass makes the pixels and
    counts the tokens (`tokenizer`: for one whose prompts write text in a video, Qwen3-VL's timestamps)."""

    def __init__(self, backbone, settings: VideoSettings | GridVideoSettings, tokenizer=None):
        self.backbone, self.settings = backbone, settings
        self.min_side = backbone.config.vision_config.patch_size

    def load(self, video: VideoLike, num_frames: int | None = None) -> Clip:
        frames = load_frames(video, self.min_side)
        indices = self.settings.frame_indices(len(frames), num_frames)
        return Clip([frames[index] for index in indices], tuple(indices))

    def tokens(self, clip: Clip) -> list[int]:
        """A video's tokens in the prompt (before any start and end tokens around them)."""
        return [self.backbone.config.video_token_id] * self.token_count(clip)

    def save_pretrained(self, folder: str | Path) -> None:
        settings = self.settings
        content = {"video_processor_type": self.backbone.video_processor_name, **settings.sampling_fields(),
                   **self.frame_fields(), "image_mean": list(settings.image_mean),
                   "image_std": list(settings.image_std),
                   "rescale_factor": settings.rescale_factor, "resample": settings.resample,
                   "do_resize": settings.do_resize, "do_rescale": settings.do_rescale,
                   "do_normalize": settings.do_normalize}
        write_json(Path(folder) / VIDEO_PREPROCESSOR_CONFIG, content)


class VideoFrames(Videos):
    """LLaVA-OneVision's video inputs: each video's frames sampled to the checkpoint's count and prepared with its
    video settings (`visor.data.frames.VideoSettings`), all videos in one (videos, frames, 3, H, W) tensor; a
    video's tokens are as many as the model side computes for its frames (`Backbone.video_tokens`)."""

    settings_class, load_settings = VideoSettings, staticmethod(load_video_settings)

    def token_count(self, clip: Clip) -> int:
        return self.backbone.video_tokens(len(clip)).visual_tokens

    def __call__(self, rows: list[list[Clip]]) -> dict:
        videos = [video for row in rows for video in row]
        counts = sorted({len(video) for video in videos})
        if len(counts) > 1:
            raise ValueError(f"the videos of a batch must keep the same number of frames, got {counts} (a video "
                             "shorter than num_frames keeps all its frames): pass num_frames at most the shortest")
        return {"pixel_values_videos": torch.from_numpy(np.stack([self.settings.pixels(video.frames)
                                                                  for video in videos]))}

    def frame_fields(self) -> dict:
        return {"size": dict(zip(("height", "width"), self.settings.size))}


class GridVideos(Videos):
    """Qwen2.5-VL's video inputs, as its stock video processor makes them: each frame resized to the family's frame
    size within the video settings' pixel bounds (`Backbone.resized_frames`; `visor.data.frames.GridVideoSettings`)
    and prepared as the family's stock image processor prepares an image; every `temporal_patch_size` frames one
    temporal patch (the last frame repeated to fill the last one), its patches flattened in the image processor's
    order. All videos' patches go in one (patches, features) tensor, with each video's (t, h, w) grid and its
    seconds per temporal patch (frames read with Pillow have no times: the stock rate, `seconds_per_temporal_patch`);
    a video's tokens are its grid's merged patches, between the vision start and end tokens. Videos of a batch may
    differ in frame count and size."""

    settings_class = GridVideoSettings

    def __init__(self, backbone, settings: GridVideoSettings, tokenizer=None):
        super().__init__(backbone, settings)
        self.frame_processor = settings.frame_processor(backbone)

    @classmethod
    def load_settings(cls, folder: str | Path | None, backbone, image_processor) -> GridVideoSettings:
        return load_grid_video_settings(folder, backbone, image_processor, cls.settings_class)

    def frame_size(self, clip: Clip) -> tuple[int, int]:
        """The (height, width) of the clip's frames as prepared: resized by the family's rule within the pixel
        bounds, or as they are (whole merged patches) where the settings do not resize."""
        settings, processor = self.settings, self.frame_processor
        merged = processor.patch_size * processor.merge_size
        height, width = clip.frames[0].height, clip.frames[0].width
        if settings.do_resize:
            return self.backbone.resized_frames(len(clip), height, width, settings.min_pixels, settings.max_pixels)
        if height % merged or width % merged:
            raise ValueError(f"frames must be whole {merged}-pixel merged patches without resizing (do_resize is "
                             f"off), got {width}x{height} px")
        return height, width

    def grid(self, clip: Clip) -> tuple[int, int, int]:
        """(t, h, w) patches of a video of these frames: whole temporal patches, each frame's patch grid."""
        patch = self.frame_processor.patch_size
        height, width = self.frame_size(clip)
        return math.ceil(len(clip) / self.frame_processor.temporal_patch_size), height // patch, width // patch

    def token_count(self, clip: Clip) -> int:
        return math.prod(self.grid(clip)) // self.frame_processor.merge_size**2

    def __call__(self, rows: list[list[Clip]]) -> dict:
        videos = [video for row in rows for video in row]
        return {"pixel_values_videos": torch.from_numpy(np.concatenate([self.patches(video) for video in videos])),
                "video_grid_thw": torch.tensor([self.grid(video) for video in videos]), **self.timing(videos)}

    def timing(self, videos: list[Clip]) -> dict:
        """Each video's seconds per temporal patch, at the stock rate for untimed frames."""
        return {"second_per_grid_ts": torch.tensor([self.backbone.seconds_per_temporal_patch(len(video))
                                                    for video in videos])}

    def patches(self, clip: Clip) -> np.ndarray:
        """(t·h·w, channels × temporal patch × patch²) float32: the frames resized to `frame_size` (transformers'
        `resize`, as the stock PIL image processor resizes), then through the stock image processor (which repeats a
        still image over the temporal patch: one copy is kept per frame), grouped into temporal patches."""
        temporal, patch = self.frame_processor.temporal_patch_size, self.frame_processor.patch_size
        frames = clip.frames
        if self.settings.do_resize:
            size = self.frame_size(clip)
            frames = [resize(frame, size, resample=self.settings.resample, return_numpy=False,
                             input_data_format=ChannelDimension.LAST) for frame in frames]
        prepared = self.frame_processor(frames, do_resize=False, return_tensors="np")
        per_frame = int(prepared["image_grid_thw"][0].prod())
        pixels = prepared["pixel_values"].reshape(len(frames), per_frame, -1, temporal, patch**2)[:, :, :, 0]
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], -len(frames) % temporal, axis=0)])
        groups = len(pixels) // temporal
        pixels = pixels.reshape(groups, temporal, per_frame, -1, patch**2).transpose(0, 2, 3, 1, 4)
        return pixels.reshape(groups * per_frame, -1)

    def frame_fields(self) -> dict:
        processor = self.frame_processor
        return {"size": {"shortest_edge": self.settings.min_pixels, "longest_edge": self.settings.max_pixels},
                "patch_size": processor.patch_size, "merge_size": processor.merge_size,
                "temporal_patch_size": processor.temporal_patch_size}


class TimedGridVideos(GridVideos):
    """Qwen3-VL's video inputs, as its stock processor makes them: frames sampled by time (`visor.data.frames.
    TimedGridVideoSettings`), resized together within the pixel bounds (its 3-D `smart_resize`) and prepared in
    temporal patches as `GridVideos` prepares them, with no seconds per temporal patch: the time is in the text.
    Each temporal patch's tokens follow its timestamp ("<t seconds>", one decimal, `temporal_patch_times` of the
    kept frames' indices at `UNTIMED_FPS`), between vision start and end tokens of their own."""

    settings_class = TimedGridVideoSettings

    def __init__(self, backbone, settings: TimedGridVideoSettings, tokenizer=None):
        super().__init__(backbone, settings)
        self.tokenizer = tokenizer
        self.start, self.end = backbone.config.vision_start_token_id, backbone.config.vision_end_token_id

    def tokens(self, clip: Clip) -> list[int]:
        temporal, height, width = self.grid(clip)
        patch_tokens = [self.backbone.config.video_token_id] * (height * width // self.frame_processor.merge_size**2)
        out: list[int] = []
        for seconds in temporal_patch_times(clip.indices, self.frame_processor.temporal_patch_size):
            out += self.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]
            out += [self.start, *patch_tokens, self.end]
        return out

    def timing(self, videos: list[Clip]) -> dict:
        return {}


def video_side(backbone) -> type:
    """The class that makes `backbone`'s family's video inputs."""
    if "video_grid_thw" not in backbone.video_inputs:
        return VideoFrames
    return GridVideos if "second_per_grid_ts" in backbone.video_inputs else TimedGridVideos


def load_image_processor(folder: str | Path, backbone):
    """The family's stock PIL image processor with the settings of `folder`'s preprocessor config, or the family's
    defaults (a warning says so) when it has none; a ValueError names a config of another family or a broken
    field."""
    path = Path(folder) / PREPROCESSOR_CONFIG
    processor_class = backbone.image_processor_class
    if not path.is_file():
        default = backbone.default_image_processor()
        logging.getLogger(__name__).warning(
            "%s has no %s: images get %s's defaults (normalised with mean %s, std %s)", folder, PREPROCESSOR_CONFIG,
            type(backbone).__name__, list(default.image_mean), list(default.image_std))
        return default
    settings = read_json(path)
    kind = settings.get("image_processor_type")
    family_kind = processor_class.__name__.removesuffix("Pil")
    if kind is not None and kind.removesuffix("Fast").removesuffix("Pil") != family_kind:
        raise ValueError(f"{path}: image_processor_type is {kind!r}, but this {type(backbone).__name__} model's "
                         f"images are processed by {family_kind}")
    check_normalisation(path, settings)
    try:
        return processor_class.from_pretrained(str(folder), local_files_only=True)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path} holds settings {processor_class.__name__} cannot take: {error}") from error


def folder_chat_template(folder: str | Path) -> str | None:
    """The chat template a folder keeps beside its tokenizer (`CHAT_TEMPLATE_FILES`, as processors save it), if any."""
    for name in CHAT_TEMPLATE_FILES:
        path = Path(folder) / name
        if path.is_file():
            if name.endswith(".jinja"):
                return path.read_text()
            try:
                return json.loads(path.read_text())["chat_template"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path} must be a JSON object with a 'chat_template' string: {error}") from error
    return None


def load_chat_template(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The folder's processor chat template, else the tokenizer's."""
    return folder_chat_template(folder) or tokenizer.chat_template


def _check_setting(source: str, field: str, value, expected) -> None:
    if value != expected:
        raise ValueError(f"{source}: {field} is {value!r}, but the model config expects {expected!r}")


class VisorProcessor:
    """Turns images and conversations (with answers, for training) into inputs of `config`'s family.

    `VisorProcessor.from_pretrained(folder)` takes everything from a checkpoint folder; the constructor takes a
    config and a tokenizer (the chat template: `chat_template`, else the tokenizer's) and, optionally, a stock image
    processor (default: the family's defaults, `Backbone.default_image_processor`) and, for a family that reads
    video, its video settings (LLaVA-OV: `VideoSettings`, Qwen2.5-VL: `GridVideoSettings`, Qwen3-VL:
    `TimedGridVideoSettings`; default: the family's loader's, `load_video_settings` or `load_grid_video_settings`,
    from the image processor)."""

    def __init__(self, config, tokenizer: PreTrainedTokenizerBase, padding_side: str = "right",
                 image_processor=None, chat_template: str | None = None, folder: str | Path | None = None,
                 video_settings: VideoSettings | GridVideoSettings | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' (generation) or 'right' (training), got {padding_side!r}")
        # Where the pieces came from, for error messages.
        settings = None if folder is None else Path(folder) / PREPROCESSOR_CONFIG
        tokenizer_source = "the tokenizer" if folder is None else f"{folder}'s tokenizer"
        self.image_token_id = config.image_token_id
        self.image_token = _image_token(tokenizer, self.image_token_id, tokenizer_source)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"{tokenizer_source} needs a pad token and an end-of-sequence token")
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(f"{tokenizer_source} has no chat template to render prompts with")
        self.backbone = backbone_for(config)
        if image_processor is None:
            image_processor = self.backbone.default_image_processor()
        images_source = str(settings) if settings is not None and settings.is_file() else "the image processor"
        self.images = image_side(self.backbone)(self.backbone, image_processor, images_source, tokenizer)
        # `videos=` needs a family that reads video and a tokenizer that spells its video token; else it is refused.
        self.videos, self.no_video = None, f"{type(self.backbone).__name__} models take no video"
        if self.backbone.video_inputs:
            try:
                self.video_token = _image_token(tokenizer, config.video_token_id, tokenizer_source, "video")
            except ValueError as error:
                self.no_video = str(error)
            else:
                self.video_token_id = config.video_token_id
                side = video_side(self.backbone)
                if video_settings is not None and type(video_settings) is not side.settings_class:
                    raise ValueError(f"{type(self.backbone).__name__} videos take {side.settings_class.__name__}, "
                                     f"got {type(video_settings).__name__}")
                self.videos = side(self.backbone, video_settings or side.load_settings(folder, self.backbone,
                                                                                       image_processor), tokenizer)
        if video_settings is not None and self.videos is None:
            raise ValueError(f"video_settings given, but {self.no_video}")
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.typed_content = self._renders_typed_content()

    @classmethod
    def from_pretrained(cls, folder: str | Path, config=None, padding_side: str = "right") -> VisorProcessor:
        """The processor of a local checkpoint folder (stock or VISOR): its tokenizer, chat template, image
        processor settings and video settings (`video_preprocessor_config.json`); `config` defaults to the folder's
        own."""
        from transformers import AutoTokenizer

        from visor.backbones import checkpoint_config

        folder = Path(folder)
        if config is None:
            config = checkpoint_config(folder)
        if not (folder / "tokenizer_config.json").is_file():
            raise ValueError(f"{folder} has no tokenizer (tokenizer_config.json); save one next to the weights")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(config, tokenizer, padding_side, image_processor=load_image_processor(folder, backbone_for(config)),
                   chat_template=load_chat_template(folder, tokenizer), folder=folder)

    def save_pretrained(self, folder: str | Path) -> None:
        """The tokenizer, chat template, image processor and video settings into `folder`, as `from_pretrained`
        reads them back."""
        self.tokenizer.save_pretrained(folder)
        self.images.image_processor.save_pretrained(folder)
        if self.videos is not None:
            self.videos.save_pretrained(folder)
        write_text(Path(folder) / CHAT_TEMPLATE_FILES[-1], self.chat_template)

    def __call__(self, images: ImageLike | Sequence[ImageLike] | None, questions: str | Sequence[str],
                 answers: str | Sequence[str] | None = None,
                 class_maps: np.ndarray | Sequence[np.ndarray] | None = None,
                 videos: VideoLike | Sequence[VideoLike] | None = None,
                 num_frames: int | None = None) -> BatchFeature:
        """A padded batch of one image and one question per row: input_ids, attention_mask and the family's image
        inputs (LLaVA-OV: pixel_values (B, max_crops, 3, crop, crop), image_sizes, batch_num_images; Qwen-VL:
        pixel_values (patches, features), image_grid_thw and mm_token_type_ids), plus labels when `answers` are
        given and patch_targets when `class_maps` are. A single image and question make a batch of one.

        `videos`: one video per row (a path to a folder of frames or an animated GIF / WebP, or a list of frames;
        see `visor.data.frames.load_frames`), after the row's image or instead of it (`images=None`), sampled to at
        most `num_frames` frames (default: the checkpoint's rule); the family's video inputs join the batch (LLaVA-OV:
        pixel_values_videos (videos, frames, 3, crop, crop); Qwen2.5-VL: pixel_values_videos (patches, features),
        video_grid_thw and second_per_grid_ts; Qwen3-VL: pixel_values_videos and video_grid_thw)."""
        questions = _as_list(questions, str)
        images = None if images is None else _as_list(images, (Image.Image, str, Path, np.ndarray))
        videos = None if videos is None else _as_list(videos, (str, Path))
        answers = None if answers is None else _as_list(answers, str)
        class_maps = None if class_maps is None else _as_list(class_maps, np.ndarray)  # entries may be None
        if not questions:
            raise ValueError("the batch is empty")
        if images is None and videos is None:
            raise ValueError("each row needs an image or a video: pass images, videos or both")
        for name, values in (("images", images), ("videos", videos), ("answers", answers),
                             ("class_maps", class_maps)):
            if values is not None and len(values) != len(questions):
                raise ValueError(f"got {len(questions)} questions but {len(values)} {name}")
        conversations = []
        for row, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"questions must be non-empty text, got {question!r}")
            for marker in {IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, *self._visual_tokens().values()}:
                if marker in question:
                    raise ValueError(f"questions must not contain {marker}; the processor places the image and video")
            places = (f"{IMAGE_PLACEHOLDER}\n" if images is not None else "") + (
                f"{VIDEO_PLACEHOLDER}\n" if videos is not None else "")
            messages = [{"role": "user", "content": f"{places}{question.strip()}"}]
            if answers is not None:
                if not isinstance(answers[row], str) or not answers[row].strip():
                    raise ValueError(f"answers must be non-empty text, got {answers[row]!r}")
                messages.append({"role": "assistant", "content": answers[row].strip()})
            conversations.append(messages)
        image_rows = [[] for _ in questions] if images is None else [[image] for image in images]
        video_rows = None if videos is None else [[video] for video in videos]
        return self.conversations(image_rows, conversations, prompt_only=answers is None, class_maps=class_maps,
                                  videos=video_rows, num_frames=num_frames)

    def conversations(self, images: Sequence[Sequence[ImageLike]], conversations: Sequence[Sequence[dict]],
                      prompt_only: bool = False, max_length: int | None = None,
                      class_maps: Sequence[np.ndarray | None] | None = None,
                      videos: Sequence[Sequence[VideoLike]] | None = None,
                      num_frames: int | None = None) -> BatchFeature:
        """A padded batch of chat conversations, each with its images (and videos) in the order of their
        placeholders.

        Messages are `{"role": "system" | "user" | "assistant", "content": ...}`, the content text with an
        `IMAGE_PLACEHOLDER` where each image goes (`VIDEO_PLACEHOLDER` for each video), or a list of
        `{"type": "image"}` / `{"type": "video"}` / `{"type": "text", "text"}` parts. `videos`: each conversation's
        videos, sampled to `num_frames` (default: the checkpoint's). Training rows (`prompt_only` False) are
        labelled on every assistant turn (its text and the end-of-sequence token; -100 elsewhere). `prompt_only`:
        the prompt that asks for the *last* assistant turn (left out), for generation. `max_length` cuts a longer
        row from its end; a cut into an image's or a video's tokens is a ValueError.
        """
        if len(images) != len(conversations):
            raise ValueError(f"got {len(images)} image lists but {len(conversations)} conversations")
        if not conversations:
            raise ValueError("the batch is empty")
        if videos is not None and self.videos is None:
            raise ValueError(self.no_video)
        if videos is not None and len(videos) != len(conversations):
            raise ValueError(f"got {len(videos)} video lists but {len(conversations)} conversations")
        loaded = [[load_image(image, min_side=self.images.min_side) for image in row] for row in images]
        clips = [[self.videos.load(video, num_frames) for video in row] for row in videos or [[] for _ in images]]
        sequences, label_rows = [], []
        for row, (row_images, row_videos, messages) in enumerate(zip(loaded, clips, conversations)):
            ids, labels = self._conversation_ids([self._message(message) for message in messages], prompt_only)
            ids, labels, images_end = self._expand_images(ids, labels, row_images, row_videos, row)
            if max_length is not None and len(ids) > max_length:
                if images_end > max_length:
                    raise ValueError(f"conversation {row} needs {len(ids)} tokens and its images end at token "
                                     f"{images_end}, after max_length {max_length}: raise it or use smaller images")
                ids, labels = ids[:max_length], labels[:max_length]
            sequences.append(ids)
            label_rows.append(labels)

        batch = {
            "input_ids": self._pad(sequences, self.tokenizer.pad_token_id),
            "attention_mask": self._pad([[1] * len(ids) for ids in sequences], 0),
            **(self.images(loaded) if any(loaded) else {}),
            **(self.videos(clips) if any(clips) else {}),
        }
        batch |= self.images.prompt_inputs(batch["input_ids"], self.image_token_id,
                                           self.video_token_id if self.videos is not None else None)
        if not prompt_only:
            batch["labels"] = self._pad(label_rows, IGNORE_INDEX)
        if class_maps is not None:
            batch["patch_targets"] = self.images.patch_targets([image for row in loaded for image in row],
                                                               class_maps, batch)
        return BatchFeature(batch)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of the prompt that asks for the conversation's next assistant turn, with one image token
        per image (what a serving engine takes, expanding each image itself)."""
        return self._conversation_ids([self._message(message) for message in messages], prompt_only=True)[0]

    # ---- rendering ------------------------------------------------------------------------------------------
    def _renders_typed_content(self) -> bool:
        """Whether the chat template renders typed content parts: an image part becomes the image token."""
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
        try:
            text = self._render(probe, generation_prompt=True)
        except Exception:  # a template written for text content may fail on parts in any way
            return False
        return text.count(self.image_token) == 1 and "probe" in text and "'type'" not in text

    def _visual_tokens(self) -> dict[str, str]:
        """{part type: token} of the visual kinds this family reads: the image, and the video where it takes one."""
        return {"image": self.image_token, **({"video": self.video_token} if self.videos is not None else {})}

    def _message(self, message: dict) -> dict:
        """A message as this chat template takes it: typed parts, or text with the image (video) token in place."""
        content = message.get("content")
        tokens = self._visual_tokens()
        placeholders = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
        if isinstance(content, list):
            parts = content
        elif isinstance(content, str):
            if not self.typed_content:
                for kind, token in tokens.items():
                    content = content.replace(placeholders[kind], token)
                return {**message, "content": content}
            kinds = {placeholders[kind]: kind for kind in tokens}
            pieces = re.split("(" + "|".join(map(re.escape, kinds)) + ")", content)
            parts = []
            for index, piece in enumerate(pieces):
                if index % 2:  # a placeholder
                    parts.append({"type": kinds[piece]})
                    continue
                # LLaVA's data writes "<image>\n" before the text; the templates place their own separators.
                piece = piece.removeprefix("\n") if index else piece
                piece = piece.removesuffix("\n") if index < len(pieces) - 1 else piece
                if piece:
                    parts.append({"type": "text", "text": piece})
        else:
            raise ValueError(f"message content must be text or a list of parts, got {type(content).__name__}")
        for part in parts:
            if not isinstance(part, dict) or part.get("type") not in (*tokens, "text") or (
                    part["type"] == "text" and not isinstance(part.get("text"), str)):
                kinds = " or ".join(f"{{'type': '{kind}'}}" for kind in tokens)
                raise ValueError(f"content parts must be {kinds} or {{'type': 'text', 'text': ...}}, got {part!r}")
        if self.typed_content:
            return {**message, "content": parts}
        text = "\n".join(part["text"] if part["type"] == "text" else tokens[part["type"]] for part in parts)
        return {**message, "content": text}

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _conversation_ids(self, messages: Sequence[dict], prompt_only: bool) -> tuple[list[int], list[int]]:
        """Ids (one image-token id per image) and labels of a conversation, rendered by the chat template turn by
        turn: each assistant turn is what the template adds to the conversation before it, closed by the
        end-of-sequence token where the template does not write one (the model must learn to stop)."""
        if prompt_only and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the reference answer, left for the model to give
        answers = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
        if not prompt_only and not answers:
            raise ValueError("a training conversation needs an assistant turn")
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for turn in answers:
            context = self._render(messages[:turn], generation_prompt=True)
            answered = self._render(messages[:turn + 1], generation_prompt=False)
            prompt, answer = self._continuation(rendered, context), self._continuation(context, answered)
            after = []  # template text after the end-of-sequence token (a newline, say): context, not answer
            if eos in answer:
                answer, after = answer[:answer.index(eos) + 1], answer[answer.index(eos) + 1:]
            else:
                answer = answer + [eos]
            if turn == len(messages) - 1:
                after = []  # nothing follows the conversation's last answer
            ids += prompt + answer + after
            labels += [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(after)
            rendered = answered
        if prompt_only:
            prompt = self._continuation(rendered, self._render(messages, generation_prompt=True))
            ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
        return ids, labels

    def _continuation(self, before: str, text: str) -> list[int]:
        """Token ids of what `text` adds to `before`, which must be its beginning."""
        if not text.startswith(before):
            raise ValueError("the chat template does not render this conversation turn by turn (a later turn "
                             "changes the text of an earlier one), so its turns cannot be labelled")
        rest = text[len(before):]
        return self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []

    def _expand_images(self, ids: list[int], labels: list[int], images: list[Image.Image], videos: list[Clip],
                       row: int) -> tuple[list[int], list[int], int]:
        """Each image-token id replaced by as many as the stock processor writes for that image, each video-token
        id by the tokens the stock processor writes for that video's frames (in order: `Videos.tokens`); also where
        the last one ends."""
        video_id = self.video_token_id if self.videos is not None else None
        slots = [i for i, token in enumerate(ids) if token in (self.image_token_id, video_id)]
        for kind, token, items in (("image", self.image_token_id, images), ("video", video_id, videos)):
            found = sum(ids[slot] == token for slot in slots)
            if found != len(items):
                raise ValueError(f"conversation {row} has {found} {kind} placeholders but {len(items)} {kind}s")
        image_count, images, videos = len(images), iter(images), iter(videos)
        out_ids: list[int] = []
        out_labels: list[int] = []
        start = 0
        for slot in slots:
            framed = 0 < slot < len(ids) - 1 and (ids[slot - 1], ids[slot + 1]) == (
                getattr(self.images, "start", None), getattr(self.images, "end", None))
            if ids[slot] == video_id:
                tokens = self.videos.tokens(next(videos))
            else:
                image = next(images)
                tokens = [ids[slot]] * self.images.token_count((image.height, image.width), image_count)
            placeholder = self.images.frame(tokens, framed)
            out_ids += ids[start:slot] + placeholder
            out_labels += labels[start:slot] + [IGNORE_INDEX] * len(placeholder)
            start = slot + 1
        return out_ids + ids[start:], out_labels + labels[start:], len(out_ids)

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        length = max(map(len, rows))
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row)
            else:
                out[i, length - len(row):] = torch.tensor(row)
        return out

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of generated ids, cut at the first end-of-sequence, special tokens dropped."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _image_token(tokenizer: PreTrainedTokenizerBase, token_id: int, source: str, kind: str = "image") -> str:
    """The tokenizer's spelling of the config's image (or video) token; a ValueError when it has no such special
    token."""
    token = tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(tokenizer) else None
    if token is None or token_id not in tokenizer.added_tokens_decoder or (
            tokenizer.convert_tokens_to_ids(token) != token_id):
        raise ValueError(f"{source} has no special token with the id {token_id} that the model config's "
                         f"{kind}_token_id names: the tokenizer and the model do not belong together (add the {kind} "
                         f"token to the tokenizer, or set {kind}_token_id and resize the embeddings)")
    return token


def _as_list(values, single_types) -> list:
    return [values] if isinstance(values, single_types) else list(values)

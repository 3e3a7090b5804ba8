"""Video frames without a video decoder: what `VisorProcessor(videos=...)` reads, samples and normalises.

transformers' video processors need torchvision (and a decoder such as PyAV for video files); here a video is
what Pillow reads: a list of frames (PIL images, image files or uint8 arrays), a folder of frame images (in name
order), or an animated GIF or WebP. `sample_frames` keeps a uniform subset with transformers' own
`default_sample_indices_fn`, as the stock processors sample. `VideoSettings` prepares each frame as LLaVA-OV's
stock video processor does (resize to its size, rescale, normalise), with transformers' PIL image functions;
`GridVideoSettings` holds what Qwen2.5-VL's stock video processor prepares frames with (pixel bounds,
normalisation), for the family's stock PIL image processor to apply. Both come from the checkpoint's
`video_preprocessor_config.json` when the folder has one, else from the family's image settings (the frames go
through the same vision tower as the images; LLaVA-OV's at the vision tower's crop size).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from visor.data.images import MAX_IMAGE_PIXELS, ImageLike, load_image
from visor.files import read_json

VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ANIMATED_SUFFIXES = (".gif", ".webp")

VideoLike = str | Path | Sequence[ImageLike]


def load_frames(video: VideoLike, min_side: int = 1) -> list[Image.Image]:
    """The RGB frames of a video: a list of frames (each as `load_image` takes it), a folder of frame images (name
    order), or an animated GIF / WebP file; a ValueError names an empty video, an unreadable frame or frames of
    different sizes."""
    source = str(video) if isinstance(video, (str, Path)) else "video"
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            files = sorted(item for item in path.iterdir() if item.suffix.lower() in FRAME_SUFFIXES)
            frames = [load_image(item, min_side) for item in files]
        elif path.is_file() and path.suffix.lower() in ANIMATED_SUFFIXES:
            frames = _animation_frames(path, min_side)
        elif path.is_file():
            raise ValueError(f"{source} is not a folder of frames or an animated GIF / WebP (video files need a "
                             "decoder: extract their frames first)")
        else:
            raise ValueError(f"video {source} does not exist")
    elif isinstance(video, (Image.Image, np.ndarray)) or not isinstance(video, Sequence):
        raise ValueError(f"a video is a list of frames, a folder of frames or an animated GIF / WebP, got "
                         f"{type(video).__name__}")
    else:
        frames = [load_image(frame, min_side) for frame in video]
    if not frames:
        raise ValueError(f"{source} holds no frames")
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"{source}'s frames differ in size: {', '.join(f'{w}x{h}' for w, h in sizes)} px")
    return frames


def _animation_frames(path: Path, min_side: int) -> list[Image.Image]:
    try:
        animation = Image.open(path)
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image file Pillow can read") from error
    if animation.width * animation.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path} is {animation.width}x{animation.height} px, more than the {MAX_IMAGE_PIXELS:,} "
                         "pixels a frame may have")
    try:
        return [load_image(frame.copy(), min_side) for frame in ImageSequence.Iterator(animation)]
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path} is truncated or corrupt: {error}") from error


def sampled_frame_indices(total: int, num_frames: int) -> list[int]:
    """The indices of `num_frames` frames spread uniformly over a video of `total` (transformers'
    `default_sample_indices_fn`, as the stock processors sample); a shorter video keeps all its frames."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total <= num_frames:
        return list(range(total))
    return [int(index) for index in default_sample_indices_fn(VideoMetadata(total_num_frames=total),
                                                              num_frames=num_frames)]


def sample_frames(frames: list, num_frames: int) -> list:
    """`num_frames` frames spread uniformly over the video (`sampled_frame_indices`)."""
    return [frames[index] for index in sampled_frame_indices(len(frames), num_frames)]


@dataclass(frozen=True)
class VideoSettings:
    """How the family's stock video processor prepares a frame, and how many frames a video keeps."""

    size: tuple[int, int]  # (height, width) every frame is resized to
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_frames: int
    rescale_factor: float = 1 / 255
    resample: int = PILImageResampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def pixels(self, frames: list[Image.Image]) -> np.ndarray:
        """(frames, 3, height, width) float32: each RGB frame resized, rescaled and normalised."""
        out = []
        for frame in frames:
            array = np.asarray(frame.convert("RGB"))
            if self.do_resize:
                array = resize(array, self.size, resample=self.resample, input_data_format=ChannelDimension.LAST)
            array = array.astype(np.float32)
            if self.do_rescale:
                array = rescale(array, self.rescale_factor, input_data_format=ChannelDimension.LAST)
            if self.do_normalize:
                array = normalize(array, self.image_mean, self.image_std, input_data_format=ChannelDimension.LAST)
            out.append(array.transpose(2, 0, 1))
        if {array.shape[1:] for array in out} != {self.size}:
            raise ValueError(f"frames must be {self.size[0]}x{self.size[1]} px without resizing (do_resize is off)")
        return np.stack(out).astype(np.float32)


def read_video_config(folder: str | Path | None, backbone) -> tuple[Path, dict] | None:
    """`folder`'s `video_preprocessor_config.json` and its settings (None: there is none); a ValueError names a
    config of another family, a broken mean or std, and sampling by fps (frames read with Pillow have no times)."""
    path = None if folder is None else Path(folder) / VIDEO_PREPROCESSOR_CONFIG
    if path is None or not path.is_file():
        return None
    settings = read_json(path)
    kind = settings.get("video_processor_type")
    if kind is not None and kind != backbone.video_processor_name:
        raise ValueError(f"{path}: video_processor_type is {kind!r}, but this {type(backbone).__name__} model's "
                         f"videos are processed by {backbone.video_processor_name}")
    for field in ("image_mean", "image_std"):
        value = settings.get(field)
        if value is not None and (not isinstance(value, list) or len(value) != 3
                                  or not all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"{path}: {field} must be 3 numbers (one per RGB channel), got {value!r}")
    if settings.get("fps") is not None and settings.get("num_frames") is None and settings.get(
            "do_sample_frames", True):
        raise ValueError(f"{path}: sampling by fps needs frame times, which frames read with Pillow lack; set "
                         "num_frames instead")
    return path, settings


def load_video_settings(folder: str | Path | None, backbone, image_processor) -> VideoSettings:
    """The video settings of `folder`'s `video_preprocessor_config.json`, else (a warning says so) the family's
    defaults: `image_processor`'s resampling and normalisation at the vision tower's crop size, and
    `backbone.default_video_frames` frames. A ValueError names a config of another family or a broken field."""
    side = backbone.config.vision_config.image_size
    defaults = dict(size=(side, side), image_mean=tuple(image_processor.image_mean),
                    image_std=tuple(image_processor.image_std), num_frames=backbone.default_video_frames,
                    rescale_factor=image_processor.rescale_factor, resample=int(image_processor.resample))
    found = read_video_config(folder, backbone)
    if found is None:
        if folder is not None:
            logging.getLogger(__name__).warning(
                "%s has no %s: video frames get the image normalisation (mean %s, std %s) at %dx%d px, %d frames",
                folder, VIDEO_PREPROCESSOR_CONFIG, list(defaults["image_mean"]), list(defaults["image_std"]), side,
                side, defaults["num_frames"])
        return VideoSettings(**defaults)
    path, settings = found
    chosen = dict(defaults)
    for field in ("image_mean", "image_std"):
        if settings.get(field) is not None:
            chosen[field] = tuple(settings[field])
    size = settings.get("size")
    if size is not None:
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"{path}: size must be {{'height': …, 'width': …}}, got {size!r}")
        chosen["size"] = (size["height"], size["width"])
    if chosen["size"] != (side, side):
        raise ValueError(f"{path}: size is {chosen['size']}, but the model's vision tower takes {side}x{side} frames")
    for field in ("num_frames", "rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize"):
        if settings.get(field) is not None:
            chosen[field] = settings[field]
    _check_num_frames(path, chosen["num_frames"])
    return VideoSettings(**chosen)


@dataclass(frozen=True)
class GridVideoSettings:
    """How the Qwen-VL families' stock video processor (`Qwen2VLVideoProcessor`) prepares a video: each frame
    resized to whole merged patches within `min_pixels` … `max_pixels` (Qwen's `smart_resize`), rescaled and
    normalised, as the family's image processor prepares an image; and how many frames a video keeps (None: every
    frame, as the stock processor keeps them unless told to sample)."""

    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_frames: int | None = None
    rescale_factor: float = 1 / 255
    resample: int = PILImageResampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def frame_processor(self, backbone):
        """The family's stock PIL image processor with these settings and the vision config's patch sizes: what
        prepares each frame."""
        vision = backbone.config.vision_config
        return backbone.image_processor_class(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            image_mean=list(self.image_mean), image_std=list(self.image_std), rescale_factor=self.rescale_factor,
            resample=self.resample, do_resize=self.do_resize, do_rescale=self.do_rescale,
            do_normalize=self.do_normalize)


def load_grid_video_settings(folder: str | Path | None, backbone, image_processor) -> GridVideoSettings:
    """The video settings of `folder`'s `video_preprocessor_config.json` over the stock video processor's defaults
    (`backbone.min_frame_pixels` … `max_frame_pixels`, the family's normalisation); else (a warning says so) the
    settings of `image_processor`, as the stock processor then reads `preprocessor_config.json` for its video half,
    every frame kept. A ValueError names a config of another family, patch sizes the model does not read, or a
    broken field."""
    found = read_video_config(folder, backbone)
    if found is None:
        settings = GridVideoSettings(
            min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"],
            image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
            rescale_factor=image_processor.rescale_factor, resample=int(image_processor.resample),
            do_resize=image_processor.do_resize, do_rescale=image_processor.do_rescale,
            do_normalize=image_processor.do_normalize)
        if folder is not None:
            logging.getLogger(__name__).warning(
                "%s has no %s: video frames get the image processor's settings (%d to %d pixels, mean %s, std %s), "
                "every frame kept", folder, VIDEO_PREPROCESSOR_CONFIG, settings.min_pixels, settings.max_pixels,
                list(settings.image_mean), list(settings.image_std))
        return settings
    path, settings = found
    vision = backbone.config.vision_config
    for field, expected in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                            ("temporal_patch_size", vision.temporal_patch_size)):
        if settings.get(field, expected) != expected:
            raise ValueError(f"{path}: {field} is {settings[field]!r}, but the model config expects {expected!r}")
    if settings.get("cap_pixels_per_frame"):
        raise ValueError(f"{path}: cap_pixels_per_frame (a pixel budget shared by a video's frames) is not "
                         "supported; leave it off")
    size = dict(settings.get("size") or {})
    for key, legacy in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        if settings.get(legacy) is not None:  # the older spelling, which the stock processor reads too
            size[key] = settings[legacy]
    chosen = dict(min_pixels=size.pop("shortest_edge", backbone.min_frame_pixels),
                  max_pixels=size.pop("longest_edge", backbone.max_frame_pixels),
                  image_mean=tuple(settings.get("image_mean") or backbone.image_mean),
                  image_std=tuple(settings.get("image_std") or backbone.image_std))
    if size or not all(isinstance(chosen[key], int) and chosen[key] > 0 for key in ("min_pixels", "max_pixels")):
        raise ValueError(f"{path}: size must be {{'shortest_edge': …, 'longest_edge': …}} (pixel bounds), got "
                         f"{settings.get('size')!r}")
    for field in ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize"):
        if settings.get(field) is not None:
            chosen[field] = settings[field]
    if settings.get("do_sample_frames") and settings.get("num_frames") is not None:
        chosen["num_frames"] = settings["num_frames"]
        _check_num_frames(path, chosen["num_frames"])
    return GridVideoSettings(**chosen)


def _check_num_frames(path: Path, num_frames) -> None:
    if not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"{path}: num_frames must be a positive integer, got {num_frames!r}")

"""Video frames without a video decoder: what `VisorProcessor(videos=...)` reads, samples and normalises.

transformers' video processors need torchvision (and a decoder such as PyAV for video files); here a video is
what Pillow reads: a list of frames (PIL images, image files or uint8 arrays), a folder of frame images (in name
order), or an animated GIF or WebP. A loaded video is a `Clip`: the frames kept and their indices in the video.
`sampled_frame_indices` keeps a uniform subset with transformers' own `default_sample_indices_fn`, as the stock
processors of LLaVA-OV and Qwen2.5-VL sample. `VideoSettings` prepares each frame as LLaVA-OV's stock video
processor does (resize to its size, rescale, normalise), with transformers' PIL image functions;
`GridVideoSettings` holds what Qwen2.5-VL's stock video processor prepares frames with (pixel bounds,
normalisation), for the family's stock PIL image processor to apply; `TimedGridVideoSettings` adds what Qwen3-VL's
samples by (frames a second, of frames taken as `UNTIMED_FPS` a second: frames read with Pillow have no times) and
`temporal_patch_times` the times its prompts write. All come from the checkpoint's `video_preprocessor_config.json`
when the folder has one, else from the family's image settings (the frames go through the same vision tower as the
images; LLaVA-OV's at the vision tower's crop size).
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
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from visor.data.images import MAX_IMAGE_PIXELS, ImageLike, load_image
from visor.files import read_json

VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ANIMATED_SUFFIXES = (".gif", ".webp")

# The frame rate transformers' processors take for frames that come without metadata (a list of frames, as Pillow
# reads them): `VideoMetadata.sampled_fps`'s default, and what Qwen3-VL's processor samples and times frames by.
UNTIMED_FPS = 24

VideoLike = str | Path | Sequence[ImageLike]


@dataclass(frozen=True)
class Clip:
    """A video as loaded for a prompt: the frames kept (sampled, or all of them) and their indices in the video (a
    frame may be kept twice where the stock sampling repeats it)."""

    frames: list[Image.Image]
    indices: tuple[int, ...]

    @classmethod
    def of(cls, frames: list[Image.Image]) -> Clip:
        """Every frame of a video, in order."""
        return cls(list(frames), tuple(range(len(frames))))

    def __len__(self) -> int:
        return len(self.frames)


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


def sampled_frame_indices(total: int, num_frames: int | None) -> list[int]:
    """The indices of `num_frames` frames spread uniformly over a video of `total` (transformers'
    `default_sample_indices_fn`, as the stock processors sample); a shorter video keeps all its frames, and so does
    every video where `num_frames` is None."""
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_frames is None or total <= num_frames:
        return list(range(total))
    return [int(index) for index in default_sample_indices_fn(VideoMetadata(total_num_frames=total),
                                                              num_frames=num_frames)]


def temporal_patch_times(indices: Sequence[int], temporal_patch_size: int, fps: float = UNTIMED_FPS) -> list[float]:
    """Seconds into the video of each temporal patch of these frames, as Qwen3-VL's stock processor writes them
    before the patch: the mean of its first and last frame's time (the last frame repeated to fill the last patch),
    each frame's time its index / `fps`."""
    padded = [*indices, *[indices[-1]] * (-len(indices) % temporal_patch_size)]
    times = [index / fps for index in padded]
    return [(times[start] + times[start + temporal_patch_size - 1]) / 2
            for start in range(0, len(times), temporal_patch_size)]


class UniformSampling:
    """How LLaVA-OV's and Qwen2.5-VL's settings keep frames: spread uniformly (`sampled_frame_indices`), as many as
    the call asks, else `num_frames` (None: every frame)."""

    num_frames: int | None

    def frame_indices(self, total: int, num_frames: int | None = None) -> list[int]:
        return sampled_frame_indices(total, num_frames or self.num_frames)

    def sampling_fields(self) -> dict:
        """The sampling fields as a video config writes them."""
        return {"do_sample_frames": self.num_frames is not None, "num_frames": self.num_frames}


@dataclass(frozen=True)
class VideoSettings(UniformSampling):
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
    config of another family or a broken mean or std."""
    path = None if folder is None else Path(folder) / VIDEO_PREPROCESSOR_CONFIG
    if path is None or not path.is_file():
        return None
    settings = read_json(path)
    kind = settings.get("video_processor_type")
    if kind is not None and kind != backbone.video_processor_name:
        raise ValueError(f"{path}: video_processor_type is {kind!r}, but this {type(backbone).__name__} model's "
                         f"videos are processed by {backbone.video_processor_name}")
    check_normalisation(path, settings)
    return path, settings


def check_normalisation(path: Path, settings: dict) -> None:
    """A ValueError naming a preprocessor config's `image_mean` or `image_std` that is not 3 numbers."""
    for field in ("image_mean", "image_std"):
        value = settings.get(field)
        if value is not None and (not isinstance(value, list) or len(value) != 3
                                  or not all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"{path}: {field} must be 3 numbers (one per RGB channel), got {value!r}")


def _refuse_sampling_by_fps(path: Path, settings: dict) -> None:
    """Where the stock processor would sample by fps from the video's metadata, which frames read with Pillow lack."""
    if settings.get("fps") is not None and settings.get("num_frames") is None and settings.get(
            "do_sample_frames", True):
        raise ValueError(f"{path}: sampling by fps needs frame times, which frames read with Pillow lack; set "
                         "num_frames instead")


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
    _refuse_sampling_by_fps(path, settings)
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
class GridVideoSettings(UniformSampling):
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

    @classmethod
    def sampling(cls, path: Path, settings: dict) -> dict:
        """The sampling fields of a video config: `num_frames` where it samples, else every frame (None); sampling
        by fps is refused (it needs frame times)."""
        _refuse_sampling_by_fps(path, settings)
        if settings.get("do_sample_frames") and settings.get("num_frames") is not None:
            _check_num_frames(path, settings["num_frames"])
            return {"num_frames": settings["num_frames"]}
        return {}

    def describe_sampling(self) -> str:
        return "every frame kept" if self.num_frames is None else f"{self.num_frames} frames kept"

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


@dataclass(frozen=True)
class TimedGridVideoSettings(GridVideoSettings):
    """How Qwen3-VL's stock video processor (`Qwen3VLVideoProcessor`) prepares a video: as `GridVideoSettings`, but
    its pixel bounds hold all the video's frames together (its 3-D `smart_resize`), and it samples frames unless
    `do_sample_frames` is off: `num_frames` of them where set, else `fps` a second of a video it takes as
    `UNTIMED_FPS` frames a second (frames read with Pillow have no times), at least `min_frames` and at most
    `max_frames` and the video's own count; with neither, every frame, repeated up to `min_frames`. Defaults: the
    stock video processor's."""

    fps: float | None = Qwen3VLVideoProcessor.fps
    min_frames: int = Qwen3VLVideoProcessor.min_frames
    max_frames: int = Qwen3VLVideoProcessor.max_frames
    do_sample_frames: bool = Qwen3VLVideoProcessor.do_sample_frames

    def frame_indices(self, total: int, num_frames: int | None = None) -> list[int]:
        """The indices of the frames kept of a video of `total` frames (`num_frames`: the call's count, sampled as
        the stock processor samples a count it is given, with no fps), rounded from an even spread as the stock
        processor rounds them: frames may repeat. The call's count is the most frames the video keeps, as on the
        other families (a shorter video keeps each of its frames once, where the stock processor would repeat them;
        lmms-eval's own Qwen3-VL model caps the count it hands the stock processor the same way)."""
        if num_frames is not None and num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        count = min(num_frames, total) if num_frames else (self.num_frames if self.do_sample_frames else None)
        if count is None and not self.do_sample_frames:
            return list(range(total))
        if count is None and self.fps is not None:
            count = min(max(int(total / UNTIMED_FPS * self.fps), self.min_frames), self.max_frames, total)
        elif count is None:
            count = min(max(total, self.min_frames), self.max_frames)
        return np.linspace(0, total - 1, count).round().astype(int).tolist()

    @classmethod
    def sampling(cls, path: Path, settings: dict) -> dict:
        """The sampling fields of a video config over the stock defaults; both `num_frames` and `fps` set (the stock
        default fps counts) is refused, as the stock processor refuses it."""
        chosen = {field: settings.get(field, getattr(cls, field))
                  for field in ("num_frames", "fps", "min_frames", "max_frames", "do_sample_frames")}
        if chosen["num_frames"] is not None:
            _check_num_frames(path, chosen["num_frames"])
            if chosen["do_sample_frames"] and chosen["fps"] is not None:
                raise ValueError(f"{path}: num_frames and fps are mutually exclusive (fps defaults to "
                                 f"{cls.fps}): set fps to null to sample num_frames")
        if chosen["fps"] is not None and (isinstance(chosen["fps"], bool) or not isinstance(
                chosen["fps"], (int, float)) or chosen["fps"] <= 0):
            raise ValueError(f"{path}: fps must be a positive number or null, got {chosen['fps']!r}")
        for field in ("min_frames", "max_frames"):
            if isinstance(chosen[field], bool) or not isinstance(chosen[field], int) or chosen[field] <= 0:
                raise ValueError(f"{path}: {field} must be a positive integer, got {chosen[field]!r}")
        return chosen

    def sampling_fields(self) -> dict:
        return {"do_sample_frames": self.do_sample_frames, "num_frames": self.num_frames,
                "fps": None if self.num_frames is not None else self.fps, "min_frames": self.min_frames,
                "max_frames": self.max_frames}

    def describe_sampling(self) -> str:
        if not self.do_sample_frames:
            return "every frame kept"
        if self.num_frames is not None:
            return f"{self.num_frames} frames kept"
        return (f"{self.fps} frames a second kept of frames taken as {UNTIMED_FPS} a second "
                f"({self.min_frames} to {self.max_frames})")


def load_grid_video_settings(folder: str | Path | None, backbone, image_processor,
                             settings_class: type[GridVideoSettings] = GridVideoSettings) -> GridVideoSettings:
    """The video settings (`settings_class`) of `folder`'s `video_preprocessor_config.json` over the stock video
    processor's defaults (`backbone.min_frame_pixels` … `max_frame_pixels`, the family's normalisation, the class's
    sampling); else (a warning says so) the settings of `image_processor`, as the stock processor then reads
    `preprocessor_config.json` for its video half, sampled as the stock video processor samples by default. A
    ValueError names a config of another family, patch sizes the model does not read, or a broken field."""
    found = read_video_config(folder, backbone)
    if found is None:
        settings = settings_class(
            min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"],
            image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
            rescale_factor=image_processor.rescale_factor, resample=int(image_processor.resample),
            do_resize=image_processor.do_resize, do_rescale=image_processor.do_rescale,
            do_normalize=image_processor.do_normalize)
        if folder is not None:
            logging.getLogger(__name__).warning(
                "%s has no %s: video frames get the image processor's settings (%d to %d pixels, mean %s, std %s), "
                "%s", folder, VIDEO_PREPROCESSOR_CONFIG, settings.min_pixels, settings.max_pixels,
                list(settings.image_mean), list(settings.image_std), settings.describe_sampling())
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
    return settings_class(**chosen, **settings_class.sampling(path, settings))


def _check_num_frames(path: Path, num_frames) -> None:
    if not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"{path}: num_frames must be a positive integer, got {num_frames!r}")

"""One image from a file, an array or a PIL image, as every reader of the project loads it (the processor, the
frames of a video, the data adapters): RGB, bounded in size, truncated files refused."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Decoding is bounded: a header may claim any size (a "decompression bomb"); every processor downscales far below.
MAX_IMAGE_PIXELS = 64_000_000

ImageLike = Image.Image | str | Path | np.ndarray


def load_image(image: ImageLike, min_side: int = 1) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path or an (H, W[, C]) uint8 array; ValueError on bad input.

    Transparent images are composited on white (not on black, which a plain RGB conversion would give);
    grayscale, palette and 16-bit images are converted to RGB.
    """
    source = "image"
    if isinstance(image, (str, Path)):
        source = str(image)
        if not Path(image).is_file():
            raise ValueError(f"image file {source} does not exist")
        try:
            image = Image.open(image)
        except UnidentifiedImageError as error:
            raise ValueError(f"{source} is not an image file Pillow can read") from error
        except Image.DecompressionBombError as error:
            raise ValueError(f"{source} is too large to decode: {error}") from error
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image arrays must be (H, W) or (H, W, C) uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")
    if image.width * image.height > MAX_IMAGE_PIXELS:  # checked on the header, before decoding
        raise ValueError(f"{source} is {image.width}x{image.height} px, more than the {MAX_IMAGE_PIXELS:,} pixels "
                         "an image may have; downscale it first")
    try:
        with _strict_decoding():
            image.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{source} is truncated or corrupt: {error}") from error
    if image.mode in ("I", "I;16", "I;16B", "F"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((values * (255.0 / max(values.max(), 1.0))).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if min(image.size) < min_side:
        raise ValueError(
            f"{source} is {image.width}x{image.height} px, smaller than one {min_side}x{min_side} vision patch"
        )
    return image




@contextmanager
def _strict_decoding():
    """Pillow refusing truncated files, whatever a library set globally (lmms-eval's task module sets
    `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which would pad a cut-off image with grey)."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient

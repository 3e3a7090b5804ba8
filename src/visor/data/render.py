"""Drawing with a shadow class map: every shape drawn on the image is drawn with its class on a per-pixel map.

The synthetic tasks know what every pixel shows; `Canvas` records it as it draws, so each sample carries a dense
target (`class_map`, one class id per pixel, `PATCH_CLASSES` below) at no extra cost. `visor.data.crops` pools it
to the patch grid of every anyres crop, for an auxiliary per-patch loss (why: src/visor/demo/checkpoint/TRAINING.md). Fonts come from Pillow's built-in scalable font, so rendering needs no system font file.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour words shared with easy-VQA's answers, so one small vocabulary covers both.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 20),
    "teal": (0, 140, 140),
    "brown": (135, 80, 35),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "rectangle", "triangle")
DIGITS = tuple(str(d) for d in range(10))

PAPER = (250, 250, 247)
INK = (25, 25, 25)
RULE = (175, 175, 175)

# Per-pixel / per-patch classes. A cell, bar or mark takes the class of what answers questions about it.
PATCH_CLASSES: tuple[str, ...] = ("background",) + DIGITS + COLORS + SHAPES
CLASS_ID = {name: index for index, name in enumerate(PATCH_CLASSES)}
IGNORE_INDEX = -100  # no target (padding outside the image, or data without class maps)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at `size` px (no system font needed)."""
    return ImageFont.load_default(size=max(int(size), 4))


class Canvas:
    """An RGB image and its per-pixel class map, drawn together."""

    def __init__(self, height: int, width: int, background: tuple[int, int, int] = PAPER):
        self.image = Image.new("RGB", (width, height), background)
        self._classes = Image.new("I", (width, height), CLASS_ID["background"])
        self._draw = ImageDraw.Draw(self.image)
        self._draw_classes = ImageDraw.Draw(self._classes)

    def rectangle(self, box, fill, cls: str | None = None, outline=None, width: int = 1) -> None:
        self._draw.rectangle(box, fill=fill, outline=outline, width=width)
        if cls is not None:
            self._draw_classes.rectangle(box, fill=CLASS_ID[cls])

    def ellipse(self, box, fill, cls: str | None = None) -> None:
        self._draw.ellipse(box, fill=fill)
        if cls is not None:
            self._draw_classes.ellipse(box, fill=CLASS_ID[cls])

    def polygon(self, points, fill, cls: str | None = None) -> None:
        self._draw.polygon(points, fill=fill)
        if cls is not None:
            self._draw_classes.polygon(points, fill=CLASS_ID[cls])

    def line(self, points, fill, width: int = 1) -> None:
        self._draw.line(points, fill=fill, width=width)

    def text(self, center: tuple[float, float], text: str, size: int, fill=INK) -> None:
        """Text centred on `center` (anchor "mm"); text carries no class of its own (its cell or label does)."""
        self._draw.text(center, text, fill=fill, font=font(size), anchor="mm")

    def class_map(self) -> np.ndarray:
        """(H, W) int16 class ids."""
        return np.asarray(self._classes, dtype=np.int32).astype(np.int16)


def shape_points(kind: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """Vertices of a triangle (apex up) filling `box`; rectangles and circles are drawn from the box itself."""
    if kind != "triangle":
        raise ValueError(f"only triangles are drawn as polygons, not {kind!r}")
    x0, y0, x1, y1 = box
    return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]


def draw_shape(canvas: Canvas, kind: str, box, color: str, cls: str | None) -> None:
    """One filled shape of `kind` (a name in SHAPES) inside `box`, in palette colour `color`."""
    fill = PALETTE[color]
    if kind == "circle":
        canvas.ellipse(box, fill, cls)
    elif kind == "rectangle":
        canvas.rectangle(box, fill, cls)
    elif kind == "triangle":
        canvas.polygon(shape_points(kind, box), fill, cls)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")

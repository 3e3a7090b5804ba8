"""LLaVA-OneVision's anyres crop geometry on the pixel side: which image pixel each crop pixel shows.

The image processor turns an (H, W) image into a base view (the whole image squashed to one crop) plus the tiles
of the best grid pinpoint (image resized keeping its aspect, centred on zero padding, cut row-major into crops).
`CropLayout` follows that geometry with transformers' own helpers to map per-pixel class maps onto the patch grid
of every crop, aligned with `pixel_values` (the targets of the auxiliary per-patch loss). How many tokens an image
becomes is the backbone adapter's (`visor.backbones`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import LlavaOnevisionConfig
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from visor.data.render import CLASS_ID, IGNORE_INDEX, PATCH_CLASSES


@dataclass(frozen=True)
class CropLayout:
    crop: int  # crop side in px (vision_config.image_size)
    patch: int  # ViT patch side in px
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) anyres canvases

    @classmethod
    def from_config(cls, config: LlavaOnevisionConfig) -> CropLayout:
        if config.vision_feature_select_strategy != "full":
            raise ValueError(
                "only vision_feature_select_strategy='full' is supported (SigLIP has no CLS token to drop; "
                f"LLaVA-OV's anyres packing needs every patch), got {config.vision_feature_select_strategy!r}"
            )
        vision = config.vision_config
        if vision.image_size % vision.patch_size:
            raise ValueError(f"crop size {vision.image_size} is not a multiple of patch size {vision.patch_size}")
        return cls(
            crop=vision.image_size,
            patch=vision.patch_size,
            pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
        )

    @property
    def side(self) -> int:
        """Patches along one side of a crop."""
        return self.crop // self.patch

    def canvas(self, height: int, width: int) -> tuple[int, int]:
        """The grid pinpoint (height, width) an image of this size is tiled on."""
        return select_best_resolution((height, width), [list(p) for p in self.pinpoints])

    def _crop_sources(self, height: int, width: int) -> np.ndarray:
        """(crops, crop, crop, 2) source pixel (y, x) of every crop pixel's centre; -1 where it is padding."""
        pixel = np.arange(self.crop) + 0.5
        # Base view: the whole image resized to crop x crop.
        base_y = np.floor(pixel * height / self.crop).astype(np.int64)
        base_x = np.floor(pixel * width / self.crop).astype(np.int64)
        views = [np.stack(np.broadcast_arrays(base_y[:, None], base_x[None, :]), axis=-1)]
        # Tiles: resized to (new_h, new_w) keeping aspect, pasted at (top, left) on the canvas, cut row-major.
        canvas_h, canvas_w = self.canvas(height, width)
        new_h, new_w = get_patch_output_size(np.empty((0, height, width)), (canvas_h, canvas_w), ChannelDimension.FIRST)
        top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
        canvas_y = (np.arange(canvas_h) + 0.5 - top) * height / new_h
        canvas_x = (np.arange(canvas_w) + 0.5 - left) * width / new_w
        source_y = np.where((canvas_y >= 0) & (canvas_y < height), np.floor(canvas_y), -1).astype(np.int64)
        source_x = np.where((canvas_x >= 0) & (canvas_x < width), np.floor(canvas_x), -1).astype(np.int64)
        for row in range(0, canvas_h, self.crop):
            for col in range(0, canvas_w, self.crop):
                ys, xs = source_y[row:row + self.crop], source_x[col:col + self.crop]
                yy, xx = np.broadcast_arrays(ys[:, None], xs[None, :])
                views.append(np.stack((np.where(xx < 0, -1, yy), np.where(yy < 0, -1, xx)), axis=-1))
        return np.stack(views)

    def patch_targets(self, class_map: np.ndarray) -> np.ndarray:
        """(crops, side*side) int64 class per patch of every crop, in `pixel_values`' crop order.

        A patch takes the most frequent non-background class among its pixels (so a 4-px mark still marks its
        patch), else background; patches that are mostly padding get IGNORE_INDEX. Pixels are looked up by their
        centre through the same resize/pad/tile geometry as the image processor.
        """
        if class_map.ndim != 2:
            raise ValueError(f"class_map must be (H, W), got shape {class_map.shape}")
        height, width = class_map.shape
        sources = self._crop_sources(height, width)  # (C, crop, crop, 2)
        valid = sources[..., 0] >= 0
        classes = np.where(valid, class_map[sources[..., 0].clip(0), sources[..., 1].clip(0)], IGNORE_INDEX)
        num_crops, side, patch, num_classes = len(sources), self.side, self.patch, len(PATCH_CLASSES)
        # (C, side, patch, side, patch) -> (C, side*side, patch*patch) pixels of each patch
        per_patch = classes.reshape(num_crops, side, patch, side, patch).transpose(0, 1, 3, 2, 4)
        per_patch = per_patch.reshape(num_crops, side * side, patch * patch)
        known = per_patch != IGNORE_INDEX
        slot = np.arange(num_crops * side * side).reshape(num_crops, side * side, 1)
        counts = np.bincount((slot * num_classes + np.where(known, per_patch, 0))[known],
                             minlength=num_crops * side * side * num_classes)
        counts = counts.reshape(num_crops, side * side, num_classes)
        background = CLASS_ID["background"]
        foreground = counts.copy()
        foreground[..., background] = 0
        targets = np.where(foreground.sum(-1) > 0, foreground.argmax(-1), background)
        # Mostly-padding patches are ignored: the model's unpadding drops their features anyway.
        return np.where(2 * known.sum(-1) >= patch * patch, targets, IGNORE_INDEX).astype(np.int64)

"""Where an image's packed visual tokens sit on 2-D grids, so pre-LLM methods can work on them spatially.

LLaVA-OV packs one image as [base view grid (h × w, row-major)] + [hi-res grid (H × W) with one `image_newline`
token after every row], where the hi-res grid is the anyres crops stitched together, unpadded and possibly
down-sized (`pack_image_features`); anyres always gives the base view plus at least one crop. `PackedGrid` records
these shapes for one image size; it is computed by running transformers' own packing on marker features, so it
follows transformers exactly (as `visor.flops.image_tokens` does for the count).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

from visor.flops import tokens_per_crop


@dataclass(frozen=True)
class PackedGrid:
    base: tuple[int, int]  # (h, w) of the base view
    hires: tuple[int, int]  # (H, W) of the stitched crops, without the newline column

    @property
    def num_tokens(self) -> int:
        return self.base[0] * self.base[1] + self.hires[0] * (self.hires[1] + 1)

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, ...) packed tokens → base (h, w, ...) and hi-res (H, W, ...) grids (newlines dropped)."""
        h, w = self.base
        rows, cols = self.hires
        base = features[: h * w].reshape(h, w, *features.shape[1:])
        return base, features[h * w:].reshape(rows, cols + 1, *features.shape[1:])[:, :cols]

    def newlines(self) -> torch.Tensor:
        """(n,) bool: which packed tokens are `image_newline` (the end of each hi-res row)."""
        h, w = self.base
        rows, cols = self.hires
        hires = torch.zeros(rows, cols + 1, dtype=torch.bool)
        hires[:, cols] = True
        return torch.cat([torch.zeros(h * w, dtype=torch.bool), hires.flatten()])

    @staticmethod
    def assemble(base: torch.Tensor, hires: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """Inverse of `split` for any grid sizes: base tokens, then hi-res rows each closed by `newline`."""
        base = base.flatten(0, 1)
        rows = torch.cat([hires, newline.to(hires).expand(hires.shape[0], 1, -1)], dim=1)
        return torch.cat([base, rows.flatten(0, 1)])


def pack_like(config, per_crop: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Per-crop patch values (crops, patches, C) of one image packed as its visual tokens are: (n, C).

    So that anything computed per crop patch (attention received, keys …) lines up with the packed tokens;
    newline slots hold zeros and unpadded or down-sized grids follow transformers' own code.
    """
    packer = types.SimpleNamespace(config=config)  # pack_image_features reads nothing but self.config
    (packed,), _ = LlavaOnevisionModel.pack_image_features(
        packer, [per_crop], torch.tensor([list(image_size)]), per_crop.new_zeros(per_crop.shape[-1]),
        config.vision_aspect_ratio,
    )
    return packed


def packed_grid(config, image_size: tuple[int, int]) -> PackedGrid:
    """The grids of one (height, width) image under `config` (a LLaVA-OV config)."""
    height, width = int(image_size[0]), int(image_size[1])
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if side * side != tokens_per_crop(config):
        raise ValueError("pre-LLM reduction needs the full patch grid per crop (vision_feature_select_strategy='full')")
    crops = image_size_to_num_patches([height, width], config.image_grid_pinpoints, vision.image_size)
    packed = pack_like(config, torch.ones(crops, side * side, 1), (height, width))
    newlines = (packed[side * side:, 0] == 0).nonzero().squeeze(1)
    cols = int(newlines[0])
    return PackedGrid((side, side), (len(newlines), cols))

"""VisionZip (Yang et al., CVPR 2025): before the LLM, keep "dominant" tokens and merge the rest into "contextual" ones.

Dominant tokens are those that receive the most attention in the vision encoder's feature layer; SigLIP has no
[CLS], so a token's score is the attention it receives averaged over heads and queries of its crop. The rest are merged into a few contextual tokens: evenly spaced targets among them, every other token
joins its most similar target (cosine of the layer's keys, averaged over heads), and a contextual token is the
target plus the mean of its members, as in the reference. Of a budget of k tokens, 10/64 are contextual (the
reference's 54 + 10 setting). Scores come from that one layer's q/k projections (`vision_attention`), so the
tower keeps its fast attention; `vision_overhead_flops` counts the extra score and similarity matmuls (vision
side, not LLM prefill).

Here the budget is a fraction `keep` of each image's grid tokens, chosen over the whole packed image (base
view and hi-res rows together), and merging happens on the projected tokens. Every `image_newline` token is
kept in its place on top of the budget (and counted): the language model reads the image block's rows through
them, and a block with none is an input it never saw. When an image is one crop in size, its base view and its
only hi-res crop show the same pixels, so the dominant tokens of the two views can be the same patches twice.

Reference vs paper (dvlab-research/VisionZip): the paper selects by [CLS] attention and merges by key
similarity; the reference does exactly that at CLIP layer -2 (attentions[-2], the LLaVA feature layer), sums
the [CLS] row over heads, keeps [CLS] among the dominant tokens (`dominant - 1` patches), merges in the vision
encoder's hidden space before the projector, and, for LLaVA-NeXT, applies the same fixed counts to every
anyres crop independently. Its LLaVA-NeXT path (`restore_image_features_sorted`) builds the newline column and
never uses it, so the hi-res rows reach the LLM without newlines; one newline follows a single-crop image. It
monkey-patches CLIP's attention globally to obtain weights. We use the feature layer of LLaVA-OV (SigLIP, no
[CLS]), one budget per image across its crops, keep the newlines, and merge after the projector (LLaVA-OV's
unpadding and newlines are defined on projected tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from visor.backbones import backbone_for
from visor.reduction.prellm import PreLLMReduced
from visor.reduction.pruned import check_keep, kept_count
from visor.reduction.vision_attention import (
    captured_queries_keys,
    feature_layer_index,
    received_attention,
    received_attention_flops,
)

CONTEXTUAL_SHARE = 10 / 64


@dataclass(frozen=True)
class VisionZip:
    keep: float  # fraction of each image's grid tokens sent to the LLM (dominant + contextual)

    def __post_init__(self):
        check_keep(self.keep)

    def budget(self, grid_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) tokens for an image with `grid_tokens` tokens."""
        kept = kept_count(grid_tokens, self.keep)
        contextual = int(kept * CONTEXTUAL_SHARE + 0.5)
        return kept - contextual, contextual

    def kept_tokens(self, config, image_size) -> int:
        grid = backbone_for(config).packed_grid(image_size)
        if self.keep == 1:
            return grid.num_tokens
        newlines = grid.hires[0]
        return sum(self.budget(grid.num_tokens - newlines)) + newlines

    def vision_overhead_flops(self, config, image_size) -> int:
        """The score rows of the feature layer in every crop, and the merge similarities."""
        if self.keep == 1:
            return 0
        vision = config.vision_config
        head_dim = vision.hidden_size // vision.num_attention_heads
        crops = backbone_for(config).crops(image_size)
        grid = backbone_for(config).packed_grid(image_size)
        dominant, contextual = self.budget(grid.num_tokens - grid.hires[0])
        rest = grid.num_tokens - grid.hires[0] - dominant
        return received_attention_flops(config, crops) + 2 * (rest - contextual) * contextual * head_dim

    def features(self, model, pixel_values, image_sizes) -> list[torch.Tensor]:
        backbone = backbone_for(model.config)
        if self.keep == 1:
            return list(backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes))
        layer = feature_layer_index(model)
        with captured_queries_keys(model, [layer]) as captured:
            packed = backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes)
        queries, keys = captured[layer]
        received, keys = received_attention(model, layer, queries, keys), keys.mean(dim=1)
        crops = [backbone.crops(size) for size in image_sizes.tolist()]
        reduced = []
        for image, size, image_received, image_keys in zip(packed, image_sizes.tolist(), received.split(crops),
                                                           keys.split(crops)):
            grid = ~backbone.packed_grid(size).newlines().to(image.device)
            scores = backbone.pack_like(image_received[..., None], size)[:, 0]
            reduced.append(self.zip_image(image, scores, backbone.pack_like(image_keys, size), grid))
        return reduced

    def zip_image(self, features, scores, keys, grid) -> torch.Tensor:
        """(n, d) packed tokens → the dominant grid tokens and every newline token, in packed order, followed by
        the contextual tokens. `grid` (n,) marks grid tokens (the rest are `image_newline`)."""
        dominant, contextual = self.budget(int(grid.sum()))
        top = scores.masked_fill(~grid, float("-inf")).topk(dominant).indices
        kept = ~grid
        kept[top] = True
        rest = (grid & ~kept).nonzero().squeeze(1)
        if contextual == 0:
            return features[kept]
        step = max(1, len(rest) // contextual)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, len(rest), step)[:contextual]] = True
        metric = functional.normalize(keys[rest], dim=-1)
        similarity = metric[~is_target] @ metric[is_target].T
        assigned = similarity.argmax(dim=1)
        members = features[rest][~is_target]
        sums = features.new_zeros(contextual, features.shape[-1]).index_add_(0, assigned, members)
        counts = torch.bincount(assigned, minlength=contextual).clamp(min=1)[:, None]
        return torch.cat([features[kept], features[rest][is_target] + sums / counts])


def visionzip(model, keep: float = 0.1, configuration: int | None = None) -> PreLLMReduced:
    """`model` (a stock model, or VISOR at `configuration`) reading `keep` of each image's tokens via VisionZip."""
    return PreLLMReduced(model, VisionZip(keep), configuration)

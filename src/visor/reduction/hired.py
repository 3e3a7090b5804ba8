"""HiRED (Arif et al., AAAI 2025): a token budget split across anyres crops, then the top tokens inside each crop.

For each image, the budget (a fraction `keep` of its grid tokens) goes `alpha` to the base view and the rest
to the hi-res crops, in proportion to how much attention the base view's patches lying over each crop receive
in an early vision layer; inside the base view and each crop, the tokens that receive the most attention in
the feature layer are kept (SigLIP has no [CLS]: "received attention", see `vision_attention`). A crop never
gets more than it has (after LLaVA-OV's unpadding); its surplus is shared among the others, so every image
keeps exactly round(keep · grid tokens). Kept tokens stay in packed order, and every `image_newline` token stays
in its place on top of the budget (and is counted), as in the reference: the language model reads the image
block's rows through them.

Reference vs paper (hasanar1f/HiRED, `HiRED_token_selection`): the paper distributes the budget by the
[CLS] attention of an early layer over each partition's region and selects by final-layer [CLS] attention.
The reference turns the distribution map (`top_layer_attn` of the base view) into a binary mask (its top
(1 − α) · 576 tokens), then reshapes the *flattened* 24×24 mask into (rows of crops, columns of crops, −1),
i.e. contiguous row bands rather than the crops' 2-D regions; it floors each crop's share (the total then falls
short of the budget), sums heads instead of averaging, ranks with `bottom_layer_attn` inside the base view and
each crop, and runs one image at a time; its packing (`pack_HiRED_image_features`) gives the newline column a
mask of ones, so every newline is kept outside the budget, as here. We use the attention mass of each crop's 2-D region of the base view
and hand out the remainder so the budget is met exactly.
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

EARLY_LAYER = 0  # the vision layer whose attention splits the budget across crops


@dataclass(frozen=True)
class HiRED:
    keep: float  # fraction of each image's grid tokens sent to the LLM
    alpha: float = 0.5  # share of the budget for the base view (the reference's default)

    def __post_init__(self):
        check_keep(self.keep)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (the base view's share of the budget) must be in [0, 1], got {self.alpha}")

    def kept_tokens(self, config, image_size) -> int:
        grid = backbone_for(config).packed_grid(image_size)
        newlines = grid.hires[0]
        return grid.num_tokens if self.keep == 1 else kept_count(grid.num_tokens - newlines, self.keep) + newlines

    def vision_overhead_flops(self, config, image_size) -> int:
        """Early-layer scores on the base view, feature-layer scores on every crop."""
        if self.keep == 1:
            return 0
        return received_attention_flops(config, 1 + backbone_for(config).crops(image_size))

    def features(self, model, pixel_values, image_sizes) -> list[torch.Tensor]:
        config, backbone = model.config, backbone_for(model.config)
        if self.keep == 1:
            return list(backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes))
        final = feature_layer_index(model)
        with captured_queries_keys(model, sorted({EARLY_LAYER, final})) as captured:
            packed = backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes)
        crops = [backbone.crops(size) for size in image_sizes.tolist()]
        base_view = torch.tensor([0] + crops[:-1], device=pixel_values.device).cumsum(dim=0)  # each image's first crop is its base view
        early = received_attention(model, EARLY_LAYER, *(part[base_view] for part in captured[EARLY_LAYER]))
        late = received_attention(model, final, *captured[final]).split(crops)
        return [self.select(config, image, size, early_map, late_map)
                for image, size, early_map, late_map in zip(packed, image_sizes.tolist(), early, late)]

    def select(self, config, features, image_size, early: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """Kept tokens of one image: (n, d) packed features, base-view early scores (P,), late scores (crops, P)."""
        backbone = backbone_for(config)
        grid = backbone.packed_grid(image_size)
        patches = late.shape[1]
        # Which crop each packed token comes from (0 = base view), carried through the packing itself.
        crop_ids = torch.arange(len(late), dtype=late.dtype, device=late.device)[:, None, None].expand(-1, patches, 1)
        crop_of = backbone.pack_like(crop_ids, image_size)[:, 0].round().long()
        scores = backbone.pack_like(late[..., None], image_size)[:, 0]
        is_grid = ~grid.newlines().to(late.device)
        capacity = torch.bincount(crop_of[is_grid], minlength=len(late))
        budget = self._budgets(config, image_size, early, capacity, kept_count(int(is_grid.sum()), self.keep))
        # Tokens grouped by crop, best first inside each; a token's rank is its place in its crop's run.
        by_score = scores.argsort(descending=True, stable=True)
        order = by_score[crop_of[by_score].argsort(stable=True)]
        order = order[is_grid[order]]
        starts = torch.cumsum(capacity, dim=0) - capacity
        rank = torch.arange(len(order), device=order.device) - starts[crop_of[order]]
        chosen = ~is_grid  # every newline token stays, in its place
        chosen[order[rank < budget[crop_of[order]]]] = True
        return features[chosen]

    def _budgets(self, config, image_size, early, capacity, total: int) -> torch.Tensor:
        """Tokens per crop: `alpha` · total for the base view, the rest by early-attention mass, within capacity."""
        side = int(early.numel() ** 0.5)
        rows, cols = backbone_for(config).crop_grid(image_size)
        mass = functional.adaptive_avg_pool2d(early.view(1, side, side), (rows, cols)).flatten()
        base = min(int(total * self.alpha + 0.5), int(capacity[0]))
        base = max(base, total - int(capacity[1:].sum()))  # what the crops cannot hold goes back to the base view
        return torch.cat([capacity.new_tensor([base]), _share(total - base, mass, capacity[1:])])


def _share(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split `total` in proportion to `weights` (largest remainders get the odd tokens), never above `capacity`;
    what a full crop cannot take is shared again among the others."""
    budget = torch.zeros_like(capacity)
    while total > 0:
        room = capacity - budget
        weight = torch.where(room > 0, weights.clamp(min=1e-12), torch.zeros_like(weights))
        exact = total * weight / weight.sum()
        give = exact.floor().long()
        remainder = (exact - exact.floor()).masked_fill(room <= 0, -1.0)
        give[remainder.argsort(descending=True, stable=True)[: total - int(give.sum())]] += 1
        give = torch.minimum(give, room)
        budget += give
        total -= int(give.sum())
    return budget


def hired(model, keep: float = 0.2, alpha: float = 0.5, configuration: int | None = None) -> PreLLMReduced:
    """`model` (a stock model, or VISOR at `configuration`) reading `keep` of each image's tokens via HiRED."""
    return PreLLMReduced(model, HiRED(keep, alpha), configuration)

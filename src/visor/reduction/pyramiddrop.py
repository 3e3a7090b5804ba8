"""PyramidDrop (Xing et al., CVPR 2025): the LLM in stages; each stage boundary keeps a fraction λ of the visual tokens.

At each boundary layer in `layers` the visual tokens still present are ranked by the attention of the last
instruction token (the last prompt token), averaged over heads, and each sample keeps round(λ · count) of
them; after S boundaries about λ^S of the image is left ("pyramid"). Scoring is FastV's one-row attention
(`fastv.last_token_attention`) in the layer just before each boundary.

Reference vs paper (Cooperx521/PyramidDrop): the paper ranks by the last instruction token's attention at
the end of each stage; the reference (`pdrop_rank_drop`) recomputes q/k for all tokens with the *boundary*
layer's own norm and projections on its input (one extra k projection of the whole sequence per boundary),
where we read the keys the previous layer cached. The reference keeps int(count · λ^s) of the *original*
count, re-numbers positions contiguously after each drop (shifting decode positions by the dropped count),
and loops over samples in Python; we keep original positions (as FastV) and round each stage's count.
Its LLaVA-NeXT default is layers [8, 16, 24] of 32 with λ = 0.5; there it ranks the whole packed image span
(`image_tokens` is each image's feature length), `image_newline` tokens included, as here.
"""

from __future__ import annotations

from collections.abc import Sequence

from visor.reduction.fastv import last_token_attention
from visor.reduction.pruned import PruningPlan, check_keep, check_layer, pruned


def default_layers(num_layers: int) -> list[int]:
    """Stage boundaries at 1/4, 2/4 and 3/4 of the depth (the reference's [8, 16, 24] of 32)."""
    return sorted({max(1, num_layers * stage // 4) for stage in (1, 2, 3)})


def pyramiddrop_plan(config, ratio: float = 0.5, layers: Sequence[int] | None = None) -> PruningPlan:
    num_layers = config.text_config.num_hidden_layers
    layers = default_layers(num_layers) if layers is None else list(layers)
    check_keep(ratio, "ratio")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"stage boundaries must be distinct layers, got {layers}")
    for layer in layers:
        check_layer(layer, num_layers, "stage boundary")
    return PruningPlan({layer: ratio for layer in layers}, last_token_attention, name="pyramiddrop",
                       details=dict(layers=sorted(layers), ratio=ratio))


def pyramiddrop(model, ratio: float = 0.5, layers: Sequence[int] | None = None):
    """`model` (a stock model) keeping `ratio` of the remaining visual tokens at each of `layers`."""
    return pruned(model, pyramiddrop_plan(model.config, ratio, layers))

"""ShortV-style static freezing (Yuan et al., ICCV 2025): in a fixed set of layers, visual tokens are frozen.

In a frozen layer only text tokens are queries (q/o projections, MLP); the visual tokens still serve as keys
and values, computed with the layer's own norm and k/v projections from their frozen hidden states, at their
original RoPE positions, so the layer's attention is reused as a text → visual read and the visual stream
skips the layer. It is the training-free cousin of VISOR's CA layers; nothing is dropped, so the
KV cache keeps every visual key, `image_newline` tokens included (they are visual tokens, frozen like the rest).

Which layers: ShortV ranks layers by "Layer Contribution" (the output divergence when a layer's update of the
visual tokens is removed) on calibration data and freezes about 60% of them; its published lists for
LLaVA-1.5/NeXT are mostly the deepest layers plus a few early ones. Without calibration data here, the default
is the deepest `fraction` of the layers; pass `layers=` to use a measured list.

Reference vs paper (icip-cas/ShortV): the reference reads the frozen layers from the `REPLACED_LAYERS`
environment variable, slices RoPE with a hard-coded image start (`image_start_idx=35`, one LLaVA-1.5 image)
and builds on VTW's LLaVA fork; positions and masks here come from each sample's own token layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from visor.reduction.pruned import PruningPlan, check_layer, pruned


def deepest_layers(num_layers: int, fraction: float) -> list[int]:
    count = int(fraction * num_layers + 0.5)
    return list(range(num_layers - count, num_layers))


def shortv_plan(config, fraction: float = 0.6, layers: Sequence[int] | None = None) -> PruningPlan:
    num_layers = config.text_config.num_hidden_layers
    if layers is None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction of frozen layers must be in [0, 1], got {fraction}")
        layers = deepest_layers(num_layers, fraction)
    if len(set(layers)) != len(layers):
        raise ValueError(f"frozen layers must be distinct, got {list(layers)}")
    for layer in layers:
        check_layer(layer, num_layers, "frozen layer", first=0)
    return PruningPlan({}, frozen=frozenset(layers), name="shortv", details=dict(layers=sorted(layers)))


def shortv(model, fraction: float = 0.6, layers: Sequence[int] | None = None):
    """`model` (a stock model) with visual tokens frozen in `layers` (default: the deepest `fraction`)."""
    return pruned(model, shortv_plan(model.config, fraction, layers))

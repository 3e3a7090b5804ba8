"""`probe`: a stock model with chosen layers run as other layer kinds, for one analysis.

The analyses need three things the stock model cannot do by itself, each only in chosen layers:

- **measure**: read the attention weights (eager attention in those layers only, so measuring one layer does
  not change the numerics of the others);
- **blind**: the layer runs on text only, the image tokens skip it and are not attended to: VISOR's text layer
  (`visor.modeling.layers`), decoding included;
- **read**: text tokens attend to image tokens with the layer's own attention, image tokens skip the layer:
  the training-free stand-in for a CA layer (ShortV's frozen visual tokens).

A probe is the in-LLM pruning loop with nothing dropped (`visor.reduction.pruned`): the same engine that runs
VISOR's layer kinds, on the stock model's own weights. Layers not named run as in the stock model (SA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from visor.reduction.pruned import PruningPlan, pruned

# weights (B, H, Q, K) of a measured layer, with its layer index
WeightsCallback = Callable[[int, torch.Tensor], None]


def probe(model, blind: Iterable[int] = (), read: Iterable[int] = (), measure: Iterable[int] = (),
          on_weights: WeightsCallback | None = None):
    """`model` (a stock model) with `blind` and `read` layers, handing the attention weights of `measure` layers
    to `on_weights(layer, weights)`; call it or `generate()` with it as with the model."""
    plan = PruningPlan({}, frozen=frozenset(read), blind=frozenset(blind), measured=frozenset(measure),
                       name="probe", details=dict(blind=sorted(blind), read=sorted(read), measure=sorted(measure)))
    return pruned(model, plan, on_weights)

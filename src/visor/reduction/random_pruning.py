"""Random pruning: keep a random subset of each image's visual tokens, in the LLM at FastV's layer or before it.

The control every scoring method must beat at matched FLOPs (pruning benchmarks find it a strong baseline): if a
method's ranking were no better than chance, it would land here. The subset is random but fixed by a seed: a
token's score is a hash of (seed, the sample's visual-token count, the token's rank among its visual tokens), so
a sample loses the same tokens in any batch, with any padding, and on every call (deterministic; `seed` is an
argument, 0 by default). Two images of the same token count lose the same positions; another count or seed draws
another subset.

- In the LLM (`random_plan`): layers before `layer` read every token; from `layer` on, the kept fraction of each
  sample's visual tokens (FastV's layer 2 by default, so the two differ only in how tokens are chosen). Nothing
  is computed to rank, so nothing is added to the FLOPs.
- Before the LLM (`RandomSubset`): the kept fraction of each image's grid tokens goes to the LLM; its
  `image_newline` tokens stay in place on top (as VisionZip's and HiRED's here), so the LLM still reads rows.

Reference vs papers: random pruning has no reference code of its own; benchmarks draw `torch.randperm` per
sample with a global seed, which depends on batch order. The hash here gives the same distribution of subsets
(uniform over positions for one count) without that dependence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visor.backbones import backbone_for
from visor.reduction.prellm import PreLLMReduced
from visor.reduction.pruned import PruningPlan, Tokens, check_keep, check_layer, kept_count, pruned

_MASK = (1 << 31) - 1
_MULTIPLIERS = (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39)  # below 2^31, so every product fits in int64


def _mix(values: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random 31-bit integer for each int64 value (xor-shift-multiply rounds)."""
    mixed = values & _MASK
    for multiplier in _MULTIPLIERS:
        mixed = ((mixed ^ (mixed >> 15)) * multiplier) & _MASK
    return mixed


def seeded_scores(seed: int, counts: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Scores in [0, 1) for tokens of rank `ranks` among `counts` visual tokens (broadcast), fixed by `seed`."""
    mixed = _mix(_mix(_mix(torch.full_like(ranks, seed)) ^ counts) ^ ranks)
    return mixed.double() / (1 << 31)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"random pruning needs an integer seed (default 0), so that it is deterministic; got {seed!r}")
    return seed


def random_plan(config, layer: int = 2, keep: float = 0.5, seed: int = 0) -> PruningPlan:
    check_keep(keep)
    check_layer(layer, config.text_config.num_hidden_layers)
    seed = check_seed(seed)

    def scorer(layer, layer_input, rope, keys, tokens: Tokens, layer_output) -> torch.Tensor:
        visual = tokens.visual & tokens.valid
        return seeded_scores(seed, visual.sum(dim=1, keepdim=True), visual.long().cumsum(dim=1))

    return PruningPlan({layer: keep}, scorer, scoring_rows=lambda config, inputs: torch.zeros(
        len(inputs["input_ids"]), dtype=torch.long), name="random", details=dict(layer=layer, keep=keep, seed=seed))


@dataclass(frozen=True)
class RandomSubset:
    """Before the LLM: `keep` of each image's grid tokens, chosen at random (fixed by `seed`), and its newlines."""

    keep: float
    seed: int = 0

    def __post_init__(self):
        check_keep(self.keep)
        check_seed(self.seed)

    def kept_tokens(self, config, image_size) -> int:
        grid = backbone_for(config).packed_grid(image_size)
        newlines = grid.hires[0]
        return kept_count(grid.num_tokens - newlines, self.keep) + newlines

    def vision_overhead_flops(self, config, image_size) -> int:
        return 0

    def features(self, model, pixel_values, image_sizes) -> list[torch.Tensor]:
        backbone = backbone_for(model.config)
        packed = backbone.encode_images(model, 0, pixel_values=pixel_values, image_sizes=image_sizes)
        if self.keep == 1:
            return list(packed)
        return [self.subset(image, ~backbone.packed_grid(size).newlines().to(image.device))
                for image, size in zip(packed, image_sizes.tolist())]

    def subset(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(n, d) packed tokens → the chosen grid tokens and every newline token, in packed order. `grid` (n,)
        marks grid tokens (the rest are `image_newline`)."""
        count = int(grid.sum())
        scores = seeded_scores(self.seed, torch.tensor(count), grid.long().cumsum(dim=0)).masked_fill(~grid, -1.0)
        kept = ~grid
        kept[scores.topk(kept_count(count, self.keep)).indices] = True
        return features[kept]


def random_pruning(model, keep: float = 0.5, layer: int = 2, seed: int = 0, before_llm: bool = False,
                   configuration: int | None = None):
    """`model` (a stock model; before the LLM also VISOR at `configuration`) keeping a random `keep` of each sample's
    visual tokens, from `layer` on in the LLM or before it."""
    if before_llm:
        return PreLLMReduced(model, RandomSubset(keep, seed), configuration)
    if configuration is not None:
        raise ValueError("in-LLM random pruning runs on the stock model; a configuration applies before the LLM only")
    return pruned(model, random_plan(model.config, layer, keep, seed))

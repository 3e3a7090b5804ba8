"""The router's novelty guard: inputs unlike anything the router was trained on may not take the cheapest
configuration.

The router learns where the self-attention (SA) layers pay from labels on a training split; on an input unlike
any of those it cannot know. The guard notices such inputs and sends them one configuration up, a bounded
hedge: one SA layer more, never the whole stack.

"Unlike" is measured locally, as a local outlier factor: the mean distance from the input's router features to
its k nearest training features, divided by those neighbours' own k-nearest-neighbour distance. A global
distance cannot work when tasks differ in how spread out their features are (one task's normal spread is
another's outlier). The threshold κ is a quantile of the training samples' leave-one-out scores, so it sets the
guard's false-alarm rate on data like the training split (2% at the default quantile). κ is kept in the model's
config (`router_novelty_threshold`) with the router's other settings.

Opt-in (`--novelty-quantile`): spending on novel inputs pays only where SA layers help on the shift, which
nothing before the SA layers can know (measurements in docs/policy.md).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_QUANTILE = 0.98
DEFAULT_NEIGHBOURS = 5
MAX_REFERENCES = 4096  # training features kept: bounds the guard's memory and FLOPs on large label tables
MIN_RADIUS_FRACTION = 0.1  # a duplicated training feature has radius 0; floor radii at this share of the median


class NoveltyGuard(nn.Module):
    """Reference features of the router's training samples and their neighbourhood radii.

    Built empty with the shapes a config names (so `from_pretrained` can load it); `fit` fills it.
    """

    def __init__(self, feature_size: int, references: int, neighbours: int = DEFAULT_NEIGHBOURS):
        super().__init__()
        if neighbours < 1:
            raise ValueError(f"the novelty guard needs at least one neighbour, got {neighbours}")
        if references and references <= neighbours:
            raise ValueError(f"the novelty guard needs more references than neighbours, got {references} "
                             f"references for {neighbours} neighbours")
        self.neighbours = neighbours
        self.register_buffer("references", torch.zeros(references, feature_size))
        self.register_buffer("radii", torch.ones(references))

    def _distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, M) Euclidean distances to the references, through one matrix product (what `visor.flops.router_flops`
        counts), each row computed alone so a sample's scores do not depend on its batch."""
        features = features.float()
        references = self.references.float()
        squared = (features.square().sum(-1, keepdim=True) + references.square().sum(-1)
                   - 2 * torch.cat([row[None] @ references.T for row in features]))
        return squared.clamp(min=0).sqrt()

    def _scores(self, distances: torch.Tensor) -> torch.Tensor:
        near, index = distances.topk(self.neighbours, dim=-1, largest=False)
        return near.mean(-1) / self.radii[index].mean(-1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) local outlier factor: about 1 for inputs like the training split, larger the further out."""
        return self._scores(self._distances(features))

    def novel(self, features: torch.Tensor, threshold: float | None) -> torch.Tensor:
        """(B,) bool: inputs scoring above κ = `threshold` (none when there is no κ yet)."""
        if threshold is None:
            return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        return self.scores(features) > threshold

    @torch.no_grad()
    def fit(self, features: torch.Tensor, quantile: float = DEFAULT_QUANTILE, max_references: int = MAX_REFERENCES,
            seed: int = 0) -> float:
        """Keep (up to `max_references` of) the training features and their radii; returns κ, the `quantile` of
        their leave-one-out scores."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"the novelty quantile must lie in (0, 1], got {quantile}")
        if len(features) <= self.neighbours:
            raise ValueError(f"the novelty guard needs more than {self.neighbours} training samples, got {len(features)}")
        if len(features) > max_references:
            generator = torch.Generator().manual_seed(seed)
            features = features[torch.randperm(len(features), generator=generator)[:max_references]]
        device = self.references.device
        self.references = features.detach().float().to(device).clone()
        distances = self._distances(self.references)
        distances.fill_diagonal_(float("inf"))  # leave one out: a sample is not its own neighbour
        radii = distances.topk(self.neighbours, dim=-1, largest=False).values.mean(-1)
        self.radii = radii.clamp(min=MIN_RADIUS_FRACTION * float(radii.median()))
        return float(self._scores(distances).quantile(quantile))

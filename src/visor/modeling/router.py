"""The policy's router: per sample, which configuration (set of SA layers) to run.

It sits before the first optional SA layer, so deciding costs one small MLP and never re-runs a layer. It
reads the text stream's last prompt token (which has seen the question and, through the CA layers before it,
the image) and the mean of the visual tokens, and scores every configuration:

- `softmax` (the default, the paper's): one distribution over configurations, trained on the cheapest good
  one; the decision is the cheapest configuration at which the cumulative probability (cheapest first)
  reaches the threshold τ;
- `multilabel`: for each configuration the probability that it answers as well as the largest one; the
  decision is the cheapest configuration whose probability reaches τ.
Both let one trained router serve every budget: τ near 0 is cheap, τ near 1 spends. Configurations are ordered
from fewest SA layers to most (the config checks it), so "cheapest first" is index order.

The mode, τ and the novelty guard's κ live in the model's config, which the router reads: there is one place
to change them (`VisorModel.configure_router`), and the saved config routes the same way. An optional novelty
guard (`visor.modeling.novelty`) keeps inputs unlike the router's training samples off the cheapest
configuration, whatever τ says.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from visor.modeling.novelty import NoveltyGuard


class ConfigurationRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config  # not a submodule: the model's own config, the owner of mode, τ, κ and its training
        self._labelling = False
        features = 2 * config.text_config.hidden_size
        self.norm = nn.LayerNorm(features)
        self.mlp = nn.Sequential(
            nn.Linear(features, config.router_hidden_size), nn.GELU(),
            nn.Linear(config.router_hidden_size, len(config.configurations)),
        )
        self.novelty = (NoveltyGuard(features, config.router_novelty_references, config.router_novelty_neighbours)
                        if config.router_novelty_references else None)

    @property
    def trained(self) -> bool:
        """Whether `configuration="auto"` may use this router: trained (the config says on what), or labelling."""
        return self.config.router_training is not None or self._labelling

    @contextmanager
    def labelling(self):
        """Route with this router even untrained: labelling reads the features it will be trained on."""
        self._labelling = True
        try:
            yield self
        finally:
            self._labelling = False

    @property
    def mode(self) -> str:
        return self.config.router_mode

    @property
    def threshold(self) -> float:
        return self.config.router_threshold

    @property
    def num_configurations(self) -> int:
        return len(self.config.configurations)

    @staticmethod
    def features(text: torch.Tensor, visual: torch.Tensor, text_valid: torch.Tensor,
                 visual_valid: torch.Tensor) -> torch.Tensor:
        """(B, 2d): the last valid text token and the mean of the valid visual tokens (zeros if none)."""
        positions = torch.arange(text.shape[1], device=text.device)
        last = torch.where(text_valid, positions, -1).max(dim=1).values.clamp(min=0)
        last_token = text[torch.arange(text.shape[0], device=text.device), last]
        weights = visual_valid.to(visual.dtype)
        pooled = (visual * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([last_token, pooled], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) over configurations."""
        return self.mlp(self.norm(features.to(self.norm.weight.dtype)))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.mode == "multilabel" else torch.softmax(logits, dim=-1)

    def novel(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) bool: inputs the novelty guard keeps off the cheapest configuration (none without a guard or κ)."""
        if self.novelty is None:
            return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        return self.novelty.novel(features, self.config.router_novelty_threshold)

    def route(self, features: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and decisions (B,) for a batch of router features."""
        logits = self(features)
        return logits, self.decide(logits, threshold, self.novel(features))

    def decide(self, logits: torch.Tensor, threshold: float | None = None,
               novel: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) configuration indices: the cheapest that passes τ; the largest if none does. Samples flagged
        `novel` skip the cheapest configuration."""
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        passes = self.decision_scores(logits) >= threshold
        if novel is not None and passes.shape[1] > 1:
            passes[novel.cpu(), 0] = False
        passes[:, -1] = True
        return passes.float().argmax(dim=-1).to(logits.device)

    def decision_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C): the scores `decide` compares with τ (its probabilities, or in softmax mode their running sum).
        In float64 (on the CPU, as not every accelerator has it): a float32 sigmoid is exactly 1.0 beyond a logit
        of 17, which would make a sure router's decisions unreachable by τ."""
        probabilities = self.probabilities(logits.detach().to("cpu", torch.float64))
        return probabilities.cumsum(dim=-1) if self.mode == "softmax" else probabilities


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"the router threshold τ must lie in [0, 1], got {threshold}")
    return float(threshold)

"""Which configuration each sample of a VISOR forward runs, resolved once: an index for the whole batch, one index
per sample, `None` (the largest) or `"auto"` (the router decides, with τ = `router_threshold` or the config's)
become fixed per-sample indices, or routed with a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visor.modeling.router import check_threshold


@dataclass(frozen=True)
class ConfigurationChoice:
    indices: torch.Tensor | None = None  # (B,) fixed per sample; None: the router decides
    threshold: float | None = None  # τ of a routed choice (None: the config's)

    @property
    def routed(self) -> bool:
        return self.indices is None

    @classmethod
    def resolve(cls, config, configuration, batch_size: int, device, threshold: float | None = None,
                router_trained: bool = True) -> ConfigurationChoice:
        """The choice `configuration` asks for; a ValueError naming the problem for anything else."""
        if isinstance(configuration, torch.Tensor) and configuration.dim() == 0:
            configuration = configuration.item()
        if isinstance(configuration, (torch.Tensor, list, tuple)):
            indices = per_sample_indices(config, configuration)
            if len(indices) != batch_size:
                raise ValueError(f"configuration has {len(indices)} entries for a batch of {batch_size}")
        else:
            configuration = config.check_choice(configuration, router_trained)
            if configuration == "auto":
                return cls(threshold=None if threshold is None else check_threshold(threshold))
            indices = [configuration] * batch_size
        if threshold is not None:
            raise ValueError('router_threshold (τ) applies to configuration="auto" only')
        return cls(torch.tensor(indices, dtype=torch.long, device=device))


def per_sample_indices(config, configuration: torch.Tensor | list | tuple) -> list[int]:
    """One configuration index per sample, each checked: an entry that is no index (1.5, True, "a") is an error
    naming `configuration`, before anything turns the list into a tensor (which would refuse "a" in its own words
    and read True as 1)."""
    indices = configuration.tolist() if isinstance(configuration, torch.Tensor) else list(configuration)
    return [config.check_configuration(index) for index in indices]

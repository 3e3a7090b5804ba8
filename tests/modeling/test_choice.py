"""`ConfigurationChoice`: what `configuration=` asks for, resolved once, with clear errors for anything else."""

from __future__ import annotations

import copy

import pytest
import torch

from visor import VisorConfig, presets
from visor.modeling.choice import ConfigurationChoice


@pytest.fixture(scope="module")
def config():
    return VisorConfig.from_stock_config(presets.tiny(6))  # configurations [[], [1], [1, 4]]


def resolved(config, configuration, batch=2, threshold=None):
    return ConfigurationChoice.resolve(config, configuration, batch, "cpu", threshold)


def test_fixed_choices(config):
    assert resolved(config, None).indices.tolist() == [2, 2]  # the largest
    assert resolved(config, 1, batch=3).indices.tolist() == [1, 1, 1]
    assert resolved(config, [0, 2]).indices.tolist() == [0, 2]
    assert resolved(config, torch.tensor([2, 0])).indices.tolist() == [2, 0]
    assert resolved(config, torch.tensor(1)).indices.tolist() == [1, 1]
    assert not resolved(config, 0).routed


def test_auto_is_routed_with_its_threshold(config):
    choice = resolved(config, "auto", threshold=0.3)
    assert choice.routed and choice.threshold == 0.3 and resolved(config, "auto").threshold is None


@pytest.mark.parametrize("configuration, message", [
    (3, "configuration 3 does not exist"),
    (-1, "configuration -1 does not exist"),
    (1.5, "configuration 1.5 does not exist"),
    (True, "configuration True does not exist"),
    ([0, 1, 2], "3 entries for a batch of 2"),
    ([0, 1.0], "configuration 1.0 does not exist"),
    ("fastest", '"auto"'),
])
def test_anything_else_is_refused(config, configuration, message):
    with pytest.raises(ValueError, match=message):
        resolved(config, configuration)


def test_a_threshold_needs_auto_and_auto_needs_a_router(config):
    with pytest.raises(ValueError, match='applies to configuration="auto" only'):
        resolved(config, 1, threshold=0.5)
    with pytest.raises(ValueError, match="τ must lie in"):
        resolved(config, "auto", threshold=1.5)
    single = copy.deepcopy(config)
    single.configurations = single.configurations[:1]
    with pytest.raises(ValueError, match="needs a router"):
        ConfigurationChoice.resolve(single, "auto", 1, "cpu")

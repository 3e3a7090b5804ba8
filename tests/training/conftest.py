"""Fixtures for the training tests: a saved tiny stock checkpoint and the toy data source (helpers: training_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from training_helpers import HERE, TOY
from visor import presets


@pytest.fixture(scope="session")
def tiny_full_checkpoint(tmp_path_factory) -> Path:
    """A random tiny stock LLaVA-OV saved with save_pretrained: 6 text layers, so VISOR's default schedule has
    CA layers [0, 3], SA candidates [1, 4] and three nested configurations [], [1], [1, 4]."""
    config = presets.tiny(6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("tiny_full")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_path():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return TOY

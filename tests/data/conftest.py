"""Fixtures for the data tests: the tiny tokenizer and stock tiny LLaVA-OV models (offline, fp32)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from visor import presets
from visor.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def stock_models():
    """Stock models keyed by preset name, 2 text layers each."""
    torch.manual_seed(0)
    return {name: LlavaOnevisionForConditionalGeneration(build(num_layers=2)).eval()
            for name, build in (("tiny", presets.tiny), ("tiny-llama", presets.tiny_llama))}

"""Fixtures of the vLLM plugin's tests: the demo's shipped tiny model converted to VISOR (open CA gates, a random
CPE, so the image really reaches the text), its dense conversion (the stock model in the same engine), and image
questions from the demo's synthetic suite, at sizes that give different numbers of visual tokens.

Engines run in the test process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), in fp32, so greedy outputs can be compared
token for token with transformers'.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import visor

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SHIPPED = Path(visor.__file__).parent / "demo" / "checkpoint"
IMAGE_SIZES = [(128, 128), (64, 128), (128, 64), (64, 64), (100, 60), (90, 128)]


@pytest.fixture(scope="session")
def served_folders(open_visor_factory, saver):
    """{"visor", "routed", "dense": folders, "stock": the shipped folder}, each with the shipped tokenizer; "routed"
    is another conversion whose random router is marked as trained (for the mechanics of routing)."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from visor import VisorConfig, VisorForConditionalGeneration

    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(SHIPPED).eval()
    model = open_visor_factory(stock)
    torch.manual_seed(0)
    with torch.no_grad():
        model.position_encoding.conv.weight.normal_(0, 0.05)
    converted = dict(visor=model, routed=open_visor_factory(stock, trust_router=True),
                     dense=VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval())
    return {"stock": SHIPPED, **saver(converted, AutoTokenizer.from_pretrained(SHIPPED))}


@pytest.fixture(scope="session")
def image_questions():
    """Six (image, question) pairs from the demo suite's tasks, at sizes with different visual-token counts."""
    from visor.data import make_sample
    from visor.data.suites import get_suite

    tasks = get_suite("demo").tasks
    return [make_sample(tasks[index % len(tasks)], "test", index, size=size)
            for index, size in enumerate(IMAGE_SIZES)]

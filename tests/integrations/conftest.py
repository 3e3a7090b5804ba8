"""Fixtures for the integration tests: tiny checkpoints saved with their tokenizer, and the synthetic lmms-eval tasks.

Everything is fp32, offline and random-weight: the tests check plumbing and numbers against direct model calls,
not accuracy.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from visor import presets
from visor.backbones import backbone_for
from visor.data import build_tokenizer
from visor.integrations.lmms_tasks import write_task

FIRST_WORD_ID = 5  # ids below are the tiny tokenizer's special tokens


def word_checkpoints(config, open_visor, saver) -> dict:
    """{"stock": folder, "visor": folder}: a tiny stock model of `config` and its VISOR conversion (open gates,
    random router, so configurations really differ), each saved with the suite's tokenizer.

    The output head is untied and scores only the tokenizer's words (other ids get logit 0, below the best
    word's), so greedy answers are words rather than special or unused ids.
    """
    tokenizer = build_tokenizer()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    stock = backbone_for(config).stock_model_class(config).eval()
    visor = open_visor(stock, trust_router=True)
    with torch.no_grad():
        for model in (stock, visor):
            model.lm_head.weight[:FIRST_WORD_ID].zero_()
            model.lm_head.weight[len(tokenizer):].zero_()
    return saver(dict(stock=stock, visor=visor), tokenizer)


@pytest.fixture(scope="session")
def checkpoints(open_visor_factory, saver):
    """Tiny LLaVA-OV checkpoints (`word_checkpoints`)."""
    return word_checkpoints(presets.tiny(6), open_visor_factory, saver)


@pytest.fixture(scope="session", params=["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def qwen_video_checkpoints(request, open_visor_factory, saver):
    """Tiny checkpoints (`word_checkpoints`) of each Qwen-VL family that reads video."""
    return word_checkpoints(presets.PRESETS[request.param](6), open_visor_factory, saver)


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory):
    """The demo suite's synthetic lmms-eval tasks, two test samples per task."""
    return write_task(tmp_path_factory.mktemp("lmms_tasks"), suite="demo", per_task=2)


@pytest.fixture(scope="session")
def video_task_folder(tmp_path_factory):
    """The video suite's synthetic lmms-eval task, two test clips per task."""
    return write_task(tmp_path_factory.mktemp("lmms_video_tasks"), suite="video", per_task=2)

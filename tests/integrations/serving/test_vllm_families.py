"""Every family served by vLLM from a folder laid out as its checkpoints are released (tests/released_checkpoints.py),
converted to VISOR: greedy outputs equal `generate()` token for token in every configuration, in a batch of
prompts with images of different sizes. Skipped where vLLM is not installed, never in CI (`make test-serve`)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

from visor.data import VisorProcessor  # noqa: E402
from visor.integrations.vllm import engine_arguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from released_checkpoints import FAMILIES, write_open_visor_checkpoint  # noqa: E402

NEW_TOKENS = 6
QUESTIONS = ["what color is it ?", "how many shapes are there ?", "what shape is in the image ?"]
# InternVL3 is not served (the plugin refuses it by name: tests/integrations/test_vllm_cli.py).
SERVED = [family for family in FAMILIES if family != "internvl3"]


@pytest.fixture(scope="module", params=SERVED)
def served(request, tmp_path_factory):
    """A family's released folder converted to VISOR with open CA gates and a random CPE (so the image matters)."""
    return write_open_visor_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def _images(count, seed=0):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    sizes = [(64, 96), (80, 48), (64, 64), (48, 112)]
    return [Image.fromarray(torch.randint(0, 256, (*sizes[i % 4], 3), generator=generator, dtype=torch.uint8).numpy())
            for i in range(count)]


def _conversations(images_per_prompt):
    return [[{"role": "user", "content": [{"type": "image"}] * images_per_prompt + [{"type": "text", "text": q}]}]
            for q in QUESTIONS]


def _reference(model, processor, rows, conversations, configuration):
    """Greedy answers (cut after the first end-of-sequence) and the first token's log-probabilities."""
    inputs = processor.conversations(rows, conversations, prompt_only=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, configuration=configuration,
                             pad_token_id=processor.tokenizer.pad_token_id, output_scores=True,
                             return_dict_in_generate=True)
    eos = processor.tokenizer.eos_token_id
    answers = [row[: row.index(eos) + 1] if eos in row else row
               for row in out.sequences[:, inputs["input_ids"].shape[1]:].tolist()]
    return answers, torch.log_softmax(out.scores[0].float(), dim=-1)


def test_greedy_outputs_equal_generate_in_every_configuration(served):
    images_per_prompt = 1
    folder, model = served
    processor = VisorProcessor.from_pretrained(folder, padding_side="left")
    rows = [_images(images_per_prompt, seed) for seed in range(len(QUESTIONS))]
    conversations = _conversations(images_per_prompt)
    requests = [{"prompt_token_ids": processor.prompt_ids(messages), "multi_modal_data": {"image": row}}
                for row, messages in zip(rows, conversations)]
    for configuration in range(len(model.config.configurations)):
        expected, first = _reference(model, processor, rows, conversations, configuration)
        llm = LLM(**engine_arguments(str(folder), configuration, dtype="float32", max_num_seqs=4, max_model_len=2048,
                                     kv_cache_memory_bytes=64 * 2**20))
        try:
            outputs = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5))
        finally:
            del llm
            gc.collect()
        assert [list(output.outputs[0].token_ids) for output in outputs] == expected, configuration
        for row, output in enumerate(outputs):  # not only the argmax: the distribution, as fp32 computes it
            for token, logprob in output.outputs[0].logprobs[0].items():
                assert logprob.logprob == pytest.approx(float(first[row, token]), abs=1e-4), (configuration, row)


@pytest.mark.parametrize("served", ["llava-onevision", "qwen2-vl", "qwen2.5-vl"], indirect=True)
def test_precomputed_features_answer_as_the_pixels_do(served):
    """An image given as its projected features (with its patch grid, for Qwen-VL: positions depend on it) gives
    the answer its pixels give (vLLM's `enable_mm_embeds`)."""
    folder, model = served
    processor = VisorProcessor.from_pretrained(folder, padding_side="left")
    rows, conversations = [_images(1, seed) for seed in range(2)], _conversations(1)[:2]
    expected, _ = _reference(model, processor, rows, conversations, 0)
    requests = []
    for row, messages in zip(rows, conversations):
        inputs = processor.conversations([row], [messages], prompt_only=True)
        image_inputs = {name: inputs[name] for name in ("pixel_values", *model.backbone.image_inputs)
                        if name in inputs and name != "mm_token_type_ids"}
        with torch.no_grad():
            (features,) = model.backbone.encode_images(model, 0, **image_inputs)
        image = ({"image_embeds": features, "image_grid_thw": inputs["image_grid_thw"]}
                 if "image_grid_thw" in inputs else features[None])
        requests.append({"prompt_token_ids": processor.prompt_ids(messages), "multi_modal_data": {"image": image}})
    llm = LLM(**engine_arguments(str(folder), 0, dtype="float32", max_num_seqs=4, max_model_len=2048,
                                 kv_cache_memory_bytes=64 * 2**20, enable_mm_embeds=True))
    try:
        outputs = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    finally:
        del llm
        gc.collect()
    assert [list(output.outputs[0].token_ids) for output in outputs] == expected

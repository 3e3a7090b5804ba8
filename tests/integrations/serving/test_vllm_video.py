"""LLaVA-OneVision video through the vLLM plugin (`visor.integrations.vllm.processing`): a video prompt
(`multi_modal_data={"video": frames}`, a list of PIL frames or a (frames, H, W, 3) uint8 array, as vLLM's own
LLaVA-OV takes it) gets greedy answers equal to `VisorForConditionalGeneration.generate` on `VisorProcessor(videos=...)`
in every configuration, and the dense conversion's equal the stock model's. Both sides sample and prepare the frames
with the checkpoint's video settings (a clip longer than its frame count is sampled down alike). An engine serves one
modality (`engine_arguments(..., modality="video")`). Skipped where vLLM is not installed, never in CI
(`make test-serve`)."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from visor import VisorForConditionalGeneration  # noqa: E402
from visor.data import VisorProcessor  # noqa: E402
from visor.data.processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER  # noqa: E402
from visor.integrations.vllm import engine_arguments  # noqa: E402

NEW_TOKENS = 8
FRAME_SIZE = (80, 96)  # (width, height), not the vision tower's crop: both sides resize the frames
# The last clip is longer than the checkpoint's frame count (the default 32): both sides sample it down.
FRAME_COUNTS = (2, 3, 40)


def engine(folder, configuration=None) -> LLM:
    return LLM(**engine_arguments(str(folder), configuration, dtype="float32", modality="video", max_num_seqs=8,
                                  kv_cache_memory_bytes=64 * 2**20))


def release(llm: LLM) -> None:
    del llm
    gc.collect()


def prompt_ids(tokenizer, question: str, placeholder: str = VIDEO_PLACEHOLDER) -> list[int]:
    """The prompt `VisorProcessor` renders for one video (image) and question, a single placeholder id."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{placeholder}\n{question}"}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def video_questions():
    """(frames, question) clips: consecutive demo-suite images of one size as frames, the first one's question."""
    from visor.data import make_sample
    from visor.data.suites import get_suite

    tasks = get_suite("demo").tasks
    clips = []
    for clip, count in enumerate(FRAME_COUNTS):
        samples = [make_sample(tasks[(clip + frame) % len(tasks)], "test", 100 * clip + frame)
                   for frame in range(count)]
        clips.append(([sample.image.resize(FRAME_SIZE) for sample in samples], samples[0].question))
    return clips


def reference_answers(model, folder, clips, **generate_options) -> list[list[int]]:
    """Greedy answers of a transformers model on each clip, cut after the first EOS."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = VisorProcessor.from_pretrained(folder, model.config)
    answers = []
    for frames, question in clips:
        inputs = processor(None, [question], videos=[frames])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **generate_options)
        row = out[0, inputs["input_ids"].shape[1]:].tolist()
        answers.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return answers


def served_answers(llm: LLM, folder, clips) -> dict[str, list[list[int]]]:
    """Each clip served as a list of PIL frames and as one uint8 array, in one batch."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    forms = {"pil": list, "array": lambda frames: np.stack([np.asarray(frame) for frame in frames])}
    requests = [{"prompt_token_ids": prompt_ids(tokenizer, question), "multi_modal_data": {"video": form(frames)}}
                for form in forms.values() for frames, question in clips]
    outputs = [list(output.outputs[0].token_ids)
               for output in llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))]
    return {name: outputs[index * len(clips):(index + 1) * len(clips)] for index, name in enumerate(forms)}


@pytest.fixture(scope="module")
def visor_answers(served_folders, video_questions):
    model = VisorForConditionalGeneration.from_pretrained(served_folders["visor"]).eval()
    return {configuration: reference_answers(model, served_folders["visor"], video_questions,
                                             configuration=configuration)
            for configuration in range(len(model.config.configurations))}


def test_the_references_tell_configurations_apart(visor_answers):
    """The comparison below has something to compare: configurations answer the clips differently."""
    assert len({tuple(map(tuple, answers)) for answers in visor_answers.values()}) > 1


@pytest.mark.parametrize("configuration", [0, 1, 2])
def test_greedy_video_answers_equal_generate(served_folders, video_questions, visor_answers, configuration):
    llm = engine(served_folders["visor"], configuration)
    try:
        served = served_answers(llm, served_folders["visor"], video_questions)
        assert served == {"pil": visor_answers[configuration], "array": visor_answers[configuration]}
    finally:
        release(llm)


def test_dense_conversion_equals_the_stock_model_on_video(served_folders, video_questions):
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(served_folders["stock"]).eval()
    expected = reference_answers(stock, served_folders["stock"], video_questions)
    llm = engine(served_folders["dense"])
    try:
        assert served_answers(llm, served_folders["dense"], video_questions) == {"pil": expected, "array": expected}
    finally:
        release(llm)


def test_a_video_engine_refuses_images_and_a_second_video(served_folders, video_questions):
    """One modality per engine (vLLM's encoder-decoder scheduler takes one), one item per prompt."""
    llm = engine(served_folders["visor"], 0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(served_folders["visor"])
        frames, question = video_questions[0]
        image = {"prompt_token_ids": prompt_ids(tokenizer, question, IMAGE_PLACEHOLDER),
                 "multi_modal_data": {"image": frames[0]}}
        with pytest.raises(Exception, match="At most 0 image"):
            llm.generate([image], SamplingParams(max_tokens=2))
        two = {"prompt_token_ids": prompt_ids(tokenizer, question), "multi_modal_data": {"video": [frames, frames]}}
        with pytest.raises(Exception, match="At most 1 video"):
            llm.generate([two], SamplingParams(max_tokens=2))
        assert len(served_answers(llm, served_folders["visor"], video_questions[:1])["pil"][0]) > 0  # still serving
    finally:
        release(llm)


@pytest.mark.parametrize("model_type, modality, message", [
    ("visor", "audio", "modality must be 'image' or 'video'"),
    ("visor_qwen2_5_vl", "video", "video on LLaVA-OneVision checkpoints"),
])
def test_engine_arguments_refuse_what_is_not_served(tmp_path, model_type, modality, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=message):
        engine_arguments(str(tmp_path), modality=modality)

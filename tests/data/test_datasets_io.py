"""`datasets` round trip and the easy-VQA adapter."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from visor import presets
from visor.data.datasets_io import from_hf_dataset, to_hf_dataset
from visor.data.easy_vqa import easy_vqa_samples
from visor.data.processor import VisorProcessor
from visor.data.tasks import generate_split


def test_round_trip_through_disk_keeps_every_column(tmp_path):
    samples = generate_split("test", 10, seed=3)
    to_hf_dataset(samples).save_to_disk(tmp_path / "suite")
    loaded = list(from_hf_dataset(datasets.load_from_disk(str(tmp_path / "suite"))))
    assert len(loaded) == len(samples)
    for original, back in zip(samples, loaded):
        assert np.array_equal(np.asarray(original.image), np.asarray(back.image))  # PNG is lossless
        assert (back.question, back.answer, back.task, back.group) == (
            original.question, original.answer, original.task, original.group)


def test_missing_columns_and_bad_groups_are_named():
    with pytest.raises(ValueError, match="lacks columns"):
        list(from_hf_dataset(datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})))
    bad = to_hf_dataset(generate_split("test", 1)).map(lambda row: {"group": "medium"})
    with pytest.raises(ValueError, match="row 0: group"):
        list(from_hf_dataset(bad))


def test_easy_vqa_samples_are_real_images_with_answers(tokenizer):
    easy_vqa = pytest.importorskip("easy_vqa")
    answers = set(easy_vqa.get_answers())
    for split in ("train", "validation", "test"):
        samples = list(easy_vqa_samples(split, limit=6))
        assert len(samples) == 6
        assert all(s.image.size == (64, 64) and s.image.mode == "RGB" and s.answer in answers for s in samples)
        assert {s.group for s in samples} == {"easy"}
    train = {np.asarray(s.image).tobytes() for s in easy_vqa_samples("train", limit=60)}
    validation = {np.asarray(s.image).tobytes() for s in easy_vqa_samples("validation", limit=60)}
    assert not train & validation
    sample = next(easy_vqa_samples("test"))
    batch = VisorProcessor(presets.tiny(), tokenizer)(sample.image, sample.question, sample.answer)
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()

"""easy-VQA (PyPI `easy-vqa`, MIT): real 64x64 images of one coloured shape with question/answer pairs, offline.

A real but coarse set, grouped "easy". The package has train and test images; "validation" holds out every
tenth training image (with all its questions), so no image is shared between splits.
"""

from __future__ import annotations

from collections.abc import Iterator

import easy_vqa

from visor.data.processor import load_image
from visor.data.tasks import SPLITS, Sample

TASK = "easy_vqa"
VALIDATION_EVERY = 10  # training image ids divisible by this form the validation split


def easy_vqa_samples(split: str = "train", limit: int | None = None) -> Iterator[Sample]:
    """easy-VQA's samples of `split`, in the package's order (first `limit` only, when given)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "test":
        (questions, answers, image_ids), paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    else:
        (questions, answers, image_ids), paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    wanted = {"train": lambda i: i % VALIDATION_EVERY != 0, "validation": lambda i: i % VALIDATION_EVERY == 0,
              "test": lambda i: True}[split]
    emitted = 0
    for question, answer, image_id in zip(questions, answers, image_ids):
        if limit is not None and emitted >= limit:
            return
        if wanted(image_id):
            yield Sample(load_image(paths[image_id]), question, answer, TASK, "easy")
            emitted += 1

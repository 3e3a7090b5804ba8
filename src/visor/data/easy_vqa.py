"""easy-VQA (PyPI `easy-vqa`, MIT): real 64x64 images of one coloured shape with question/answer pairs, offline.

A real but coarse set, grouped "easy". The package has train and test images; "validation" holds out every
tenth training image (with all its questions), so no image is shared between splits.

Its yes/no questions are lopsided: 88% of "is there a <colour> shape?" are answered "no" (one colour of eight
is present), so a model can score well on them from the words alone; `question_kind` splits them by form and
answer so that such a model shows (scripts/easy_vqa_by_kind.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import easy_vqa
import numpy as np

from visor.data.processor import load_image
from visor.data.render import COLORS
from visor.data.tasks import SPLITS, Sample, Task

TASK = "easy_vqa"
VALIDATION_EVERY = 10  # training image ids divisible by this form the validation split
SHAPES = ("circle", "rectangle", "triangle")
SHAPE_COLORS = (*COLORS, "gray", "black")


@functools.lru_cache(maxsize=None)
def question_records(split: str) -> tuple[tuple[str, str, str], ...]:
    """(question, answer, image path) of `split`, in the package's order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "test":
        (questions, answers, image_ids), paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    else:
        (questions, answers, image_ids), paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    wanted = {"train": lambda i: i % VALIDATION_EVERY != 0, "validation": lambda i: i % VALIDATION_EVERY == 0,
              "test": lambda i: True}[split]
    return tuple((q, a, paths[i]) for q, a, i in zip(questions, answers, image_ids) if wanted(i))


def easy_vqa_samples(split: str = "train", limit: int | None = None) -> Iterator[Sample]:
    """easy-VQA's samples of `split`, in the package's order (first `limit` only, when given)."""
    records = question_records(split)
    for question, answer, path in records[:limit]:
        yield Sample(load_image(path), question, answer, TASK, "easy")


@dataclass(frozen=True)
class EasyVQA(Task):
    """easy-VQA as a suite task: sample `index` of a split is the item at a seeded permutation of the split.

    The images are the package's own (64x64 px, whatever size the suite asks for) and have no class maps, so
    they add no per-patch targets to training."""

    name: ClassVar[str] = TASK
    group: ClassVar[str] = "easy"
    answers: ClassVar[tuple[str, ...]] = ("yes", "no", *SHAPES, *SHAPE_COLORS)
    description: ClassVar[str] = "easy-VQA: real images of one shape; its colour, kind or presence"

    def make(self, split: str, index: int, seed: int, size: tuple[int, int]) -> Sample:
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        records = question_records(split)
        order = _permutation(split, seed, len(records))
        question, answer, path = records[int(order[index % len(records)])]
        return Sample(load_image(path), question, answer, TASK, self.group)


@functools.lru_cache(maxsize=8)
def _permutation(split: str, seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence((seed, SPLITS.index(split), 7))).permutation(size)


def question_kind(question: str, answer: str) -> str:
    """What a question asks, for accuracy by kind: "color", "shape", or "yes/no <color|shape>, <positive|negated>,
    answer <yes|no>" (the yes/no questions' answers are lopsided, so each cell is reported apart)."""
    if answer not in ("yes", "no"):
        return "shape" if answer in SHAPES else "color"
    words = question.rstrip("?").split()
    about = "shape" if any(word in SHAPES for word in words) else "color"
    form = "negated" if "not" in words or "no" in words else "positive"
    return f"yes/no {about}, {form}, answer {answer}"

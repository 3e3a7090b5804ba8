"""easy-VQA (PyPI `easy-vqa`, MIT): real 64x64 images of one coloured shape with question/answer pairs, offline.

A real but coarse set, grouped "easy". The package has train and test images; "validation" holds out every
tenth training image (with all its questions), so no image is shared between splits.

Its yes/no questions are lopsided: 88% of "is there a <colour> shape?" are answered "no" (one colour of eight
is present), so a model can score well on them from the words alone; `question_kind` splits them by form and
answer so that such a model shows (scripts/easy_vqa_by_kind.py). `EasyVQABalanced` asks the same 24 question
forms about the same training images with every yes/no answer equally likely: training data only.
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
from visor.data.tasks import SPLITS, Sample, Task, sample_seed

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


# easy-VQA's own 24 forms; `{}` is "<colour> shape" or "<shape>" in yes/no forms.
_PRESENT = ("is there a {}?", "is there a {} in the image?", "is a {} present?", "does the image contain a {}?")
_ABSENT = ("is there not a {}?", "is there not a {} in the image?", "is no {} present?",
           "does the image not contain a {}?")
_ASK_COLOR = ("what color is the shape?", "what is the color of the shape?", "what color is the {shape}?",
              "what is the color of the {shape}?")
_ASK_SHAPE = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
              "what is the {color} shape?")


def question_kind(question: str, answer: str) -> str:
    """What a question asks, for accuracy by kind: "color", "shape", or "yes/no <color|shape>, <positive|negated>,
    answer <yes|no>" (the yes/no questions' answers are lopsided, so each cell is reported apart)."""
    if answer not in ("yes", "no"):
        return "shape" if answer in SHAPES else "color"
    words = question.rstrip("?").split()
    about = "shape" if any(word in SHAPES for word in words) else "color"
    form = "negated" if "not" in words or "no" in words else "positive"
    return f"yes/no {about}, {form}, answer {answer}"


@functools.lru_cache(maxsize=None)
def image_attributes(split: str) -> tuple[tuple[str, str, str], ...]:
    """(image path, shape, colour) of every image of `split` whose questions name both, in the package's order.

    easy-VQA ships questions, not labels; each image's own questions (a "what shape" answer, a colour named in
    a question answered "yes", ...) give its shape and colour."""
    shape_of, color_of = {}, {}
    for question, answer, path in question_records(split):
        words = question.rstrip("?").split()
        negated = "not" in words or "no" in words
        affirmed = answer == ("no" if negated else "yes")
        named_shape = next((w for w in words if w in SHAPES), None)
        named_color = next((w for w in words if w in SHAPE_COLORS), None)
        if answer in SHAPES:
            shape_of[path] = answer
        elif answer in SHAPE_COLORS:
            color_of[path] = answer
        if answer in SHAPES or answer in SHAPE_COLORS or affirmed:
            if named_shape:
                shape_of[path] = named_shape
            if named_color:
                color_of[path] = named_color
    paths = dict.fromkeys(path for _, _, path in question_records(split))
    return tuple((path, shape_of[path], color_of[path]) for path in paths if path in shape_of and path in color_of)


def balanced_question(rng: np.random.Generator, shape: str, color: str, negations: bool = True) -> tuple[str, str]:
    """One of easy-VQA's question forms about an image of a `color` `shape`; yes and no equally likely.
    `negations=False` leaves out the negated yes/no forms ("is there not a ...")."""
    yes_no = len(_PRESENT) + (len(_ABSENT) if negations else 0)
    form = int(rng.integers(len(_ASK_COLOR) + len(_ASK_SHAPE) + yes_no))
    if form < len(_ASK_COLOR):
        return _ASK_COLOR[form].format(shape=shape), color
    form -= len(_ASK_COLOR)
    if form < len(_ASK_SHAPE):
        return _ASK_SHAPE[form].format(color=color), shape
    form -= len(_ASK_SHAPE)
    negated = form >= len(_PRESENT)
    template = (_ABSENT if negated else _PRESENT)[form % len(_PRESENT)]
    about_shape = bool(rng.integers(2))
    truth, others = (shape, SHAPES) if about_shape else (color, SHAPE_COLORS)
    present = bool(rng.integers(2))
    named = truth if present else str(rng.choice([value for value in others if value != truth]))
    question = template.format(named if about_shape else f"{named} shape")
    return question, "yes" if present != negated else "no"


@dataclass(frozen=True)
class EasyVQABalanced(Task):
    """easy-VQA's images with freshly drawn questions in its own forms, every yes/no answer equally likely.

    Training only: the images and attributes come from the split asked for, so validation and test images are
    never drawn when training; evaluate on `EasyVQA`, whose questions are the package's own."""

    name: ClassVar[str] = "easy_vqa_balanced"
    group: ClassVar[str] = "easy"
    answers: ClassVar[tuple[str, ...]] = EasyVQA.answers
    description: ClassVar[str] = "easy-VQA images, its question forms with balanced yes/no answers (training)"
    negations: bool = True  # False: no negated yes/no forms (a curriculum step)
    yes_no_only: bool = False  # True: only the yes/no forms (the comparison needs most of a batch to be learned)

    def make(self, split: str, index: int, seed: int, size: tuple[int, int]) -> Sample:
        images = image_attributes(split)
        rng = np.random.default_rng(np.random.SeedSequence(sample_seed(seed, split, self.name, index)))
        path, shape, color = images[int(rng.integers(len(images)))]
        while True:  # redraw the questions this task leaves out
            question, answer = balanced_question(rng, shape, color, self.negations)
            if self.asks(question, answer):
                return Sample(load_image(path), question, answer, self.name, self.group)

    def asks(self, question: str, answer: str) -> bool:
        """Whether this task keeps a drawn question."""
        return not self.yes_no_only or answer in ("yes", "no")


@dataclass(frozen=True)
class EasyVQAYesNo(EasyVQABalanced):
    """Only the balanced yes/no questions, under a name of their own, so that a training mix can weight them apart
    from the colour and shape questions (the comparison they ask for is learned only when it is much of a batch)."""

    name: ClassVar[str] = "easy_vqa_yes_no"
    description: ClassVar[str] = "easy-VQA images, its yes/no question forms with balanced answers (training)"
    yes_no_only: bool = True


@dataclass(frozen=True)
class EasyVQAColorYesNo(EasyVQAYesNo):
    """Only the balanced yes/no questions that name a colour ("is there a red shape?"). Trained on every yes/no
    question, the tiny model compared colours by one feature (black, brown, green, red and yellow all passed for
    one another); these questions alone, about a quarter of them such pairs, teach the whole comparison."""

    name: ClassVar[str] = "easy_vqa_color_yes_no"
    description: ClassVar[str] = "easy-VQA images, its yes/no forms naming a colour, balanced answers (training)"

    def asks(self, question: str, answer: str) -> bool:
        return question_kind(question, answer).startswith("yes/no color")

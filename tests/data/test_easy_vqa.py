"""easy-VQA: question kinds split the yes/no forms as documented; the balanced training questions agree with
every package question about their images and are balanced."""

from collections import Counter

import pytest

pytest.importorskip("easy_vqa")

import numpy as np  # noqa: E402

from visor.data.easy_vqa import (  # noqa: E402
    SHAPE_COLORS, SHAPES, EasyVQABalanced, balanced_question, image_attributes, question_kind, question_records,
)
from visor.data.tasks import make_sample  # noqa: E402


@pytest.mark.parametrize(("question", "answer", "kind"), [
    ("what is the color of the circle?", "red", "color"),
    ("what is the red shape?", "circle", "shape"),
    ("is no blue shape present?", "no", "yes/no color, negated, answer no"),
    ("does the image not contain a triangle?", "yes", "yes/no shape, negated, answer yes"),
    ("is there a rectangle in the image?", "no", "yes/no shape, positive, answer no"),
    ("is a teal shape present?", "yes", "yes/no color, positive, answer yes"),
])
def test_question_kind(question, answer, kind):
    assert question_kind(question, answer) == kind


def test_every_package_question_has_a_kind_and_yes_no_answers_are_lopsided():
    kinds = Counter(question_kind(q, a) for q, a, _ in question_records("train"))
    assert set(kinds) == {"color", "shape"} | {
        f"yes/no {about}, {form}, answer {answer}"
        for about in ("color", "shape") for form in ("positive", "negated") for answer in ("yes", "no")}
    assert sum(kinds.values()) == len(question_records("train"))
    # one colour of eight is present: positive colour questions are mostly "no", negated ones mostly "yes"
    assert kinds["yes/no color, positive, answer no"] > 5 * kinds["yes/no color, positive, answer yes"]
    assert kinds["yes/no color, negated, answer yes"] > 5 * kinds["yes/no color, negated, answer no"]
    answers = {a for _, a, _ in question_records("train")}
    assert answers <= {"yes", "no", *SHAPES, *SHAPE_COLORS}


def _answer_from_attributes(question: str, shape: str, color: str) -> str:
    """What an image of a `color` `shape` answers to `question`, read independently of the code under test."""
    words = question.rstrip("?").split()
    if "color" in words:
        return color
    if words[0] == "what":
        return shape
    named = next(w for w in words if w in SHAPES or w in SHAPE_COLORS)
    present = named in (shape, color)
    negated = "not" in words or "no" in words
    return "yes" if present != negated else "no"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_attributes_answer_every_package_question_of_their_images(split):
    attributes = {path: (shape, color) for path, shape, color in image_attributes(split)}
    assert len(attributes) > 0.85 * len({path for _, _, path in question_records(split)})
    checked = 0
    for question, answer, path in question_records(split):
        if path in attributes:
            assert _answer_from_attributes(question, *attributes[path]) == answer, (question, path)
            checked += 1
    assert checked > 1000


def test_balanced_questions_are_balanced_and_use_the_package_forms():
    package_forms = {q for q, _, _ in question_records("train")}
    rng = np.random.default_rng(0)
    drawn = [balanced_question(rng, "triangle", "teal") for _ in range(3000)]
    answers = Counter(answer for _, answer in drawn)
    assert abs(answers["yes"] - answers["no"]) < 0.1 * (answers["yes"] + answers["no"])
    assert {"triangle", "teal"} <= set(answers)
    for question, answer in drawn:
        assert _answer_from_attributes(question, "triangle", "teal") == answer
    assert {q for q, _ in drawn} <= package_forms | {q.replace("teal", c) for q in package_forms for c in SHAPE_COLORS}
    assert len({q for q, _ in drawn}) > 40


def test_balanced_task_is_deterministic_and_draws_from_its_split():
    task = EasyVQABalanced()
    first, again = make_sample(task, "train", 5, size=(64, 64)), make_sample(task, "train", 5, size=(64, 64))
    assert (first.question, first.answer) == (again.question, again.answer)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.answer in task.answers and first.group == "easy"
    validation_images = {np.asarray(make_sample(task, "validation", i, size=(64, 64)).image).tobytes() for i in range(30)}
    train_images = {np.asarray(make_sample(task, "train", i, size=(64, 64)).image).tobytes() for i in range(30)}
    assert not validation_images & train_images


def test_balanced_questions_without_negations_never_negate():
    rng = np.random.default_rng(1)
    kinds = Counter(question_kind(*balanced_question(rng, "circle", "red", negations=False)) for _ in range(600))
    assert not [kind for kind in kinds if "negated" in kind]
    assert kinds["yes/no color, positive, answer yes"] > 30 and kinds["yes/no color, positive, answer no"] > 30


@pytest.mark.parametrize(("suite", "negated"), [("yes-no", False), ("yes-no-negated", True)])
def test_yes_no_suites_ask_only_balanced_yes_no_questions(suite, negated):
    from visor.data.suites import get_suite

    (task,) = get_suite(suite).tasks
    samples = [make_sample(task, "train", i, size=(64, 64)) for i in range(200)]
    answers = Counter(s.answer for s in samples)
    assert set(answers) == {"yes", "no"} and abs(answers["yes"] - answers["no"]) < 40
    assert any("negated" in question_kind(s.question, s.answer) for s in samples) == negated


def test_demo_train_weights_yes_no_questions_apart():
    from visor.data.suites import get_suite

    tasks = {task.name: task for task in get_suite("demo-train").tasks}
    yes_no = [make_sample(tasks["easy_vqa_yes_no"], "train", i, size=(64, 64)) for i in range(100)]
    assert {s.answer for s in yes_no} == {"yes", "no"}
    assert any("negated" in question_kind(s.question, s.answer) for s in yes_no)
    mixed = {make_sample(tasks["easy_vqa_balanced"], "train", i, size=(64, 64)).answer for i in range(100)}
    assert mixed - {"yes", "no"}  # the balanced task keeps its colour and shape questions


def test_color_yes_no_task_asks_only_about_colours_with_balanced_answers():
    from visor.data.suites import get_suite

    task = next(task for task in get_suite("demo-train").tasks if task.name == "easy_vqa_color_yes_no")
    samples = [make_sample(task, "train", i, size=(64, 64)) for i in range(200)]
    kinds = Counter(question_kind(s.question, s.answer) for s in samples)
    assert all(kind.startswith("yes/no color") for kind in kinds)
    assert {"positive", "negated"} <= {kind.split(", ")[1] for kind in kinds}
    answers = Counter(s.answer for s in samples)
    assert abs(answers["yes"] - answers["no"]) < 40

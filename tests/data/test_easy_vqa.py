"""easy-VQA question kinds: every package question gets a kind, and the kinds split the yes/no forms as documented."""

from collections import Counter

import pytest

pytest.importorskip("easy_vqa")

from visor.data.easy_vqa import SHAPE_COLORS, SHAPES, question_kind, question_records  # noqa: E402


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

"""The synthetic suite: determinism, disjoint splits, fine-grained hard tasks, coarse easy tasks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from visor.data.render import CLASS_ID, COLORS, PALETTE, PAPER, SHAPES
from visor.data.tasks import (
    SPLITS, TASKS, generate_split, get_task, make_sample, sample_seed, task_names,
)


def _key(sample) -> tuple:
    return sample.image.tobytes(), sample.question, sample.answer


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_bytes_different_seed_different_sample(task):
    a, b = make_sample(task, "train", 3, seed=7), make_sample(task, "train", 3, seed=7)
    assert _key(a) == _key(b)
    assert np.array_equal(a.class_map, b.class_map)
    assert _key(make_sample(task, "train", 3, seed=8)) != _key(a)
    assert _key(make_sample(task, "train", 4, seed=7)) != _key(a)


def test_split_seed_streams_are_disjoint_and_samples_never_overlap():
    indices = range(40)
    seeds = {split: {sample_seed(0, split, task, i) for task in TASKS for i in indices} for split in SPLITS}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not seeds[first] & seeds[second]
    contents = {split: {_key(s) for s in generate_split(split, 5 * 40, seed=0)} for split in SPLITS}
    assert all(len(keys) == 200 for keys in contents.values())  # no duplicates inside a split either
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not contents[first] & contents[second]


def test_generate_split_cycles_tasks_and_windows_agree():
    whole = generate_split("validation", 12, seed=1)
    assert [s.task for s in whole[:len(TASKS)]] == list(TASKS)
    assert [_key(s) for s in generate_split("validation", 5, seed=1, start=7)] == [_key(s) for s in whole[7:]]
    assert {s.group for s in whole} == {"hard", "easy"}
    assert task_names("hard") == ["read_cell", "key_digit", "bar_value", "count_marks"]
    assert task_names("easy") == ["dominant_color", "has_shape"]


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_stay_in_the_documented_space_at_odd_sizes(task):
    for index, size in enumerate([(128, 128), (96, 200), (200, 72), (384, 384)]):
        sample = make_sample(task, "test", index, size=size)
        assert sample.answer in TASKS[task].answers
        assert sample.image.size == (size[1], size[0]) and sample.image.mode == "RGB"
        assert sample.class_map.shape == size and sample.class_map.dtype == np.int16


def test_bad_knobs_tasks_and_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="rows and cols"):
        get_task("read_cell", rows=12)
    with pytest.raises(ValueError, match="no knob"):
        get_task("bar_value", wobble=1)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split"):
        make_sample("read_cell", "dev", 0)
    for size in ((16, 16), (64, 5000)):
        with pytest.raises(ValueError, match="32 to 4096 px a side"):
            make_sample("read_cell", "train", 0, size=size)
    assert get_task("read_cell", rows=8).rows == 8


# --- hard tasks: the answer lives in a region of a few percent of the image --------------------------------


def _changed_box(a: Image.Image, b: Image.Image) -> tuple[int, int, int, int] | None:
    diff = np.any(np.asarray(a) != np.asarray(b), axis=-1)
    if not diff.any():
        return None
    ys, xs = np.nonzero(diff)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _inside(box, region) -> bool:
    x0, y0, x1, y1 = box
    return x0 >= np.floor(region[0]) and y0 >= np.floor(region[1]) and x1 <= np.ceil(region[2]) + 1 \
        and y1 <= np.ceil(region[3]) + 1


def _area_fraction(region, scene) -> float:
    return (region[2] - region[0]) * (region[3] - region[1]) / (scene.height * scene.width)


def _masked(image: Image.Image, region) -> np.ndarray:
    pixels = np.asarray(image).copy()
    x0, y0, x1, y1 = (int(np.floor(region[0])), int(np.floor(region[1])), int(np.ceil(region[2])) + 1,
                      int(np.ceil(region[3])) + 1)
    pixels[y0:y1, x0:x1] = 0
    return pixels


def _scene(task, index):
    rng = np.random.default_rng(np.random.SeedSequence(sample_seed(0, "test", task, index)))
    return get_task(task).make_scene(rng, 128, 128)


@pytest.mark.parametrize("index", range(6))
def test_read_cell_answer_lives_in_one_cell(index):
    scene = _scene("read_cell", index)
    row, col = scene.target
    digits = [list(r) for r in scene.digits]
    digits[row][col] = (digits[row][col] + 1 + index) % 10
    other = dataclasses.replace(scene, digits=tuple(map(tuple, digits)))
    region = scene.cell_box(row, col)
    assert other.answer != scene.answer and other.question == scene.question
    assert _inside(_changed_box(scene.render().image, other.render().image), region)
    assert _area_fraction(region, scene) < 0.03
    # With the cell masked, both images are identical: the rest of the page cannot tell the answers apart.
    assert np.array_equal(_masked(scene.render().image, region), _masked(other.render().image, region))


@pytest.mark.parametrize("index", range(6))
def test_bar_value_answer_lives_in_one_bar_column(index):
    scene = _scene("bar_value", index)
    values = list(scene.values)
    values[scene.target] = (values[scene.target] + 1 + index) % 10
    other = dataclasses.replace(scene, values=tuple(values))
    region = scene.column_box(scene.target)
    assert other.answer != scene.answer and other.question == scene.question
    assert _inside(_changed_box(scene.render().image, other.render().image), region)
    assert _area_fraction(region, scene) < 0.05
    assert np.array_equal(_masked(scene.render().image, region), _masked(other.render().image, region))


@pytest.mark.parametrize("index", range(6))
def test_count_marks_each_counted_mark_is_a_tiny_region(index):
    scene = _scene("count_marks", index)
    counted = [i for i, (_, _, color) in enumerate(scene.marks) if color == scene.target]
    for i in counted:
        marks = list(scene.marks)
        marks[i] = (*marks[i][:2], "gray")  # recolour one mark: the count drops by one
        other = dataclasses.replace(scene, marks=tuple(marks))
        region = scene.mark_box(i)
        assert int(other.answer) == int(scene.answer) - 1
        assert _inside(_changed_box(scene.render().image, other.render().image), region)
        assert _area_fraction(region, scene) < 0.002
    assert int(scene.answer) == len(counted)


# --- easy tasks: answers survive 4x downsampling (pixel-statistics oracles) --------------------------------

_COLORS = np.array([PALETTE[c] for c in COLORS] + [PAPER], dtype=np.float64)


def _nearest_color(image: Image.Image) -> np.ndarray:
    """(h, w) index into COLORS of each pixel of a 4x downsampled image; len(COLORS) = paper, -1 = a blend
    of colours at an edge (no colour within 40 per channel)."""
    small = image.resize((image.width // 4, image.height // 4), Image.BOX)
    distance = ((np.asarray(small, dtype=np.float64)[..., None, :] - _COLORS) ** 2).sum(-1)
    return np.where(distance.min(-1) < 3 * 40**2, distance.argmin(-1), -1)


def test_dominant_color_survives_4x_downsampling():
    for sample in generate_split("test", 40, tasks=["dominant_color"]):
        counts = np.bincount(_nearest_color(sample.image).ravel() + 1, minlength=len(_COLORS) + 1)[1:][: len(COLORS)]
        assert COLORS[counts.argmax()] == sample.answer


def test_has_shape_survives_4x_downsampling():
    answers = []
    for sample in generate_split("test", 40, tasks=["has_shape"]):
        nearest = _nearest_color(sample.image)
        counts = np.bincount(nearest.ravel() + 1, minlength=len(_COLORS) + 1)[1:][: len(COLORS)]
        mask = nearest == counts.argmax()  # the large shape's colour covers the most pixels
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        asked = sample.question.split()[-2]
        assert ("yes" if kind == asked else "no") == sample.answer, (sample.question, fill)
        answers.append(sample.answer)
    assert 10 < answers.count("yes") < 30  # both answers occur


def test_class_maps_label_what_the_question_is_about():
    grid = make_sample("read_cell", "train", 0)
    assert set(np.unique(grid.class_map)) <= {CLASS_ID[str(d)] for d in range(10)} | {CLASS_ID["background"]}
    shape = make_sample("has_shape", "train", 0)
    assert any(CLASS_ID[kind] in shape.class_map for kind in SHAPES)
    marks = make_sample("count_marks", "train", 0)
    target = marks.question.split()[2]
    assert (marks.class_map == CLASS_ID[target]).any() == (marks.answer != "0")


def test_read_cell_ink_pointer_colours_only_the_target_digit():
    from visor.data.render import PALETTE

    task = get_task("read_cell", rows=3, cols=3, pointer="ink")
    sample = make_sample(task, "train", 0, size=(64, 64))
    colour = sample.question.split()[3]
    pixels = set(map(tuple, np.asarray(sample.image).reshape(-1, 3).tolist()))
    assert PALETTE[colour] in pixels, "the named ink is drawn"
    default = make_sample(get_task("read_cell", rows=3, cols=3), "train", 0, size=(64, 64))
    assert "row" in default.question, "the default pointer names the position"
    with pytest.raises(ValueError, match="pointer"):
        get_task("read_cell", pointer="arrow")


def test_count_marks_max_count_knob():
    task = get_task("count_marks", num_colors=1, max_count=2)
    assert all(int(make_sample(task, "train", i, size=(64, 64)).answer) <= 2 for i in range(30))
    with pytest.raises(ValueError, match="max_count"):
        get_task("count_marks", max_count=10)


@pytest.mark.parametrize("index", range(6))
def test_key_digit_needs_both_the_key_and_the_digit(index):
    scene = _scene("key_digit", index)
    row, col, key_color = scene.key
    assert scene.answer == str(scene.digits[scene.target[0]][scene.target[1]])
    assert len({color for _, _, color in scene.inks}) == len(scene.inks) == 3  # distinct colours, one is the key's
    # Hop one: recolour the key to another ink's colour; only the key cell changes, and the answer moves to that digit.
    other_row, other_col, other_color = next(ink for ink in scene.inks if ink[2] != key_color)
    recoloured = dataclasses.replace(scene, key=(row, col, other_color))
    assert recoloured.answer == str(scene.digits[other_row][other_col])
    assert _inside(_changed_box(scene.render().image, recoloured.render().image), scene.cell_box(row, col))
    # Hop two: change the target digit; only its cell changes, and so does the answer.
    digits = [list(r) for r in scene.digits]
    digits[scene.target[0]][scene.target[1]] = (digits[scene.target[0]][scene.target[1]] + 1 + index) % 10
    redrawn = dataclasses.replace(scene, digits=tuple(map(tuple, digits)))
    assert redrawn.answer != scene.answer and redrawn.question == scene.question
    assert _inside(_changed_box(scene.render().image, redrawn.render().image), scene.cell_box(*scene.target))


def test_key_digit_draws_the_key_as_a_circle_and_checks_its_knobs():
    sample = make_sample(get_task("key_digit", inks=4), "train", 0, size=(128, 128))  # at 64 px glyphs blend
    pixels = set(map(tuple, np.asarray(sample.image).reshape(-1, 3).tolist()))
    assert sum(PALETTE[color] in pixels for color in COLORS) == 4
    assert sample.question == "what digit is the color of the circle ?"
    assert any(CLASS_ID[color] in sample.class_map for color in COLORS), "the key is labelled with its colour"
    with pytest.raises(ValueError, match="inks"):
        get_task("key_digit", inks=len(COLORS) + 1)
    with pytest.raises(ValueError, match="must hold"):
        get_task("key_digit", rows=1, cols=2, inks=2)

"""The video tasks: determinism, disjoint splits, balanced answers, and that each hard task needs time."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visor.data.render import COLORS, DIGITS, PALETTE, SHAPES
from visor.data.tasks import SPLITS, sample_seed
from visor.data.video_tasks import VIDEO_SIZE, VIDEO_TASKS, generate_video_split, get_video_task, make_video_sample


def _key(sample) -> tuple:
    return tuple(frame.tobytes() for frame in sample.frames), sample.question, sample.answer


def _scene(task, index):
    rng = np.random.default_rng(np.random.SeedSequence(sample_seed(0, "test", task, index)))
    return VIDEO_TASKS[task].make_scene(rng, *VIDEO_SIZE)


def _frame_bytes(scene) -> list[bytes]:
    return [frame.tobytes() for frame in scene.render()]


@pytest.mark.parametrize("task", list(VIDEO_TASKS))
def test_same_seed_same_bytes_different_seed_different_sample(task):
    a, b = make_video_sample(task, "train", 3, seed=7), make_video_sample(task, "train", 3, seed=7)
    assert _key(a) == _key(b)
    assert _key(make_video_sample(task, "train", 3, seed=8)) != _key(a)
    assert _key(make_video_sample(task, "train", 4, seed=7)) != _key(a)
    # The scenes the tests below edit are the samples' own.
    assert _frame_bytes(_scene(task, 5)) == list(_key(make_video_sample(task, "test", 5))[0])


def test_splits_never_overlap():
    contents = {split: {_key(s) for s in generate_video_split(split, 4 * 30, seed=0)} for split in SPLITS}
    assert all(len(keys) == 120 for keys in contents.values())  # no duplicates inside a split either
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not contents[first] & contents[second]


@pytest.mark.parametrize("task", list(VIDEO_TASKS))
def test_frames_share_one_size_and_their_number_is_the_knob(task):
    for index, (size, frames) in enumerate([((64, 64), 8), ((48, 96), 2), ((96, 48), 5)]):
        sample = make_video_sample(get_video_task(task, frames=frames), "validation", index, size=size)
        assert len(sample.frames) == frames
        assert all(frame.size == (size[1], size[0]) and frame.mode == "RGB" for frame in sample.frames)
        assert sample.task == task and sample.group == VIDEO_TASKS[task].group


_REACHABLE = {"which_frame": set(DIGITS[1:9]), "count_frames": set(DIGITS[:9]), "what_changed": set(SHAPES),
              "dominant_color_video": set(COLORS)}  # at 8 frames


@pytest.mark.parametrize("task", list(VIDEO_TASKS))
def test_answers_are_in_the_answer_set_and_roughly_balanced(task):
    answers = Counter(s.answer for s in generate_video_split("train", 200, tasks=[task]))
    assert set(answers) <= set(VIDEO_TASKS[task].answers)
    assert set(answers) == _REACHABLE[task]  # every answer occurs...
    assert max(answers.values()) <= 2 * 200 / len(_REACHABLE[task])  # ...and none is more than twice its share


# --- which_frame: the answer is where in time the target's frame is ------------------------------------------


def _target_index(frame, target) -> int:
    return next(i for i, (kind, _, color) in enumerate(frame) if (color, kind) == target)


def _changes_only(a, b, boxes) -> bool:
    """Whether two frames differ, and only inside `boxes` (frame fractions; a pixel of rounding either side), each
    less than 3% of the frame: what the answer hangs on is small regions."""
    changed = np.any(np.asarray(a) != np.asarray(b), axis=-1)
    allowed = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        if (x1 - x0) * (y1 - y0) >= 0.03:
            return False
        allowed[int(np.floor(y0 * a.height)):int(np.ceil(y1 * a.height)) + 1,
                int(np.floor(x0 * a.width)):int(np.ceil(x1 * a.width)) + 1] = True
    return changed.any() and not (changed & ~allowed).any()


@pytest.mark.parametrize("index", range(6))
def test_which_frame_answer_moves_with_the_target_frame_not_with_any_frame_content(index):
    scene = _scene("which_frame", index)
    shown = int(scene.answer) - 1
    other = (shown + 1 + index) % len(scene.frames)
    frames = list(scene.frames)
    frames[shown], frames[other] = frames[other], frames[shown]
    moved = dataclasses.replace(scene, frames=tuple(frames))
    # The same frames, pixel for pixel, in another order: no frame's content gives the answer, its place does.
    assert sorted(_frame_bytes(moved)) == sorted(_frame_bytes(scene))
    assert moved.question == scene.question and moved.answer == str(other + 1) != scene.answer
    # The target is a small region of its frame; without it no frame shows it, and the question has no answer.
    frames, target = list(scene.frames), _target_index(scene.frames[shown], scene.target)
    frames[shown] = tuple(s for i, s in enumerate(frames[shown]) if i != target)
    removed = dataclasses.replace(scene, frames=tuple(frames))
    assert _changes_only(scene.render()[shown], removed.render()[shown], [scene.frames[shown][target][1]])
    assert _frame_bytes(removed)[:shown] == _frame_bytes(scene)[:shown]
    with pytest.raises(ValueError, match="exactly one frame"):
        removed.answer


@pytest.mark.parametrize("task", ["which_frame", "count_frames"])
def test_every_frame_holds_one_shape_of_the_targets_colour_and_one_of_its_kind(task):
    """So no count of shapes, colours or kinds finds the frames that show it: only binding the two does."""
    for index in range(20):
        scene = _scene(task, index)
        color, kind = scene.target
        assert len({len(frame) for frame in scene.frames}) == 1
        for frame in range(len(scene.frames)):
            inks = [i for i, (_, _, ink) in enumerate(scene.frames[frame]) if ink == color]
            shapes = [i for i, (shape, _, _) in enumerate(scene.frames[frame]) if shape == kind]
            assert len(inks) == len(shapes) == 1 and (inks == shapes) == scene.shows(frame)


# --- count_frames: every frame adds its one bit, and only together do they count ------------------------------


def _toggled(scene, frame: int):
    """`scene` with the target's presence in `frame` flipped as the task draws frames, shapes recoloured in place:
    the target and a shape sharing neither its colour nor its kind become its two lures, or back."""
    (color, kind), shapes = scene.target, list(scene.frames[frame])
    other_color = next(c for c in COLORS if c != color and all(c != ink for _, _, ink in shapes))
    other_kind = next(k for k in SHAPES if k != kind)
    if scene.shows(frame):
        t = _target_index(shapes, scene.target)
        n = next(i for i, (shape, _, ink) in enumerate(shapes) if shape != kind and ink != color)
        shapes[t], shapes[n] = (other_kind, shapes[t][1], color), (kind, shapes[n][1], other_color)
    else:
        c = next(i for i, (_, _, ink) in enumerate(shapes) if ink == color)
        k = next(i for i, (shape, _, _) in enumerate(shapes) if shape == kind)
        shapes[c], shapes[k] = (kind, shapes[c][1], color), (other_kind, shapes[k][1], other_color)
    frames = list(scene.frames)
    frames[frame] = tuple(shapes)
    return dataclasses.replace(scene, frames=tuple(frames))


@pytest.mark.parametrize("index", range(6))
def test_count_frames_no_single_frame_determines_the_count(index):
    scene = _scene("count_frames", index)
    count = int(scene.answer)
    assert count == sum(scene.shows(frame) for frame in range(len(scene.frames)))
    for frame in range(len(scene.frames)):
        # Flip another frame: this frame's pixels stay as they are, and the count moves by one.
        other = (frame + 1) % len(scene.frames)
        edited = _toggled(scene, other)
        assert _frame_bytes(edited)[frame] == _frame_bytes(scene)[frame]
        assert int(edited.answer) == count + (-1 if scene.shows(other) else 1)
        assert edited.question == scene.question
        # What changed is two small shapes in the flipped frame.
        boxes = [old[1] for old, new in zip(scene.frames[other], edited.frames[other]) if old != new]
        assert len(boxes) == 2 and _changes_only(scene.render()[other], edited.render()[other], boxes)


# --- what_changed: first against last frame ------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6))
def test_what_changed_no_single_frame_determines_which_shape_changed(index):
    scene = _scene("what_changed", index)
    frames, count = scene.frames, len(scene.frames)
    changer = next(k for k, ((_, _, a), (_, _, b)) in enumerate(zip(frames[0], frames[-1])) if a != b)
    assert scene.answer == frames[0][changer][0]
    assert all(len({color for _, _, color in frame}) == len(frame) for frame in frames)  # no colour repeats
    assert any(frames[0][k][1] != frames[-1][k][1] for k in range(len(frames[0])))  # the shapes move
    for frame in range(count):
        # A clip that shares this frame pixel for pixel, in which another shape changes colour: it holds this
        # frame's colours except that shape, which has a colour no shape has here after (or, for the last
        # frame, before) it.
        colors = [color for _, _, color in frames[frame]]
        other = (changer + 1) % len(colors)
        new = next(color for color in COLORS if color not in colors)
        edited = tuple(
            tuple((kind, box, new if k == other and (t > frame if frame < count - 1 else t < frame) else colors[k])
                  for k, (kind, box, _) in enumerate(frames[t]))
            for t in range(count))
        clip = dataclasses.replace(scene, frames=edited)
        assert _frame_bytes(clip)[frame] == _frame_bytes(scene)[frame]
        assert clip.answer == frames[0][other][0] != scene.answer
    # Without the change the clip differs only inside the changing shape's small box, in the frames after it.
    steady = tuple(tuple((kind, box, frames[0][changer][2] if k == changer else color)
                         for k, (kind, box, color) in enumerate(frame)) for frame in frames)
    for frame, (a, b) in enumerate(zip(scene.render(), dataclasses.replace(scene, frames=steady).render())):
        assert a.tobytes() == b.tobytes() or _changes_only(a, b, [frames[frame][changer][1]])
    assert frames[-1] != steady[-1]
    with pytest.raises(ValueError, match="exactly one shape"):
        dataclasses.replace(scene, frames=steady).answer


# --- dominant_color_video: any one frame answers it ----------------------------------------------------------


def test_dominant_color_video_every_frame_alone_answers_it_even_4x_downsampled():
    for sample in generate_video_split("test", 20, tasks=["dominant_color_video"]):
        for frame in sample.frames:
            small = np.asarray(frame.resize((frame.width // 4, frame.height // 4), Image.BOX), dtype=np.int64)
            counts = {color: int((np.abs(small - PALETTE[color]).max(-1) < 40).sum()) for color in COLORS}
            assert max(counts, key=counts.get) == sample.answer
        assert len({frame.tobytes() for frame in sample.frames}) > 1  # the shapes move


# --- bad input -----------------------------------------------------------------------------------------------


def test_bad_frames_knobs_tasks_and_sizes_raise_clear_errors():
    for task, frames in (("which_frame", 0), ("which_frame", 1), ("count_frames", 10), ("what_changed", 1),
                         ("dominant_color_video", 0), ("dominant_color_video", 65)):
        with pytest.raises(ValueError, match=f"{task}: frames must be in"):
            get_video_task(task, frames=frames)
    with pytest.raises(ValueError, match="answers are one digit"):
        get_video_task("which_frame", frames=10)
    with pytest.raises(ValueError, match="a first and a last frame"):
        get_video_task("what_changed", frames=1)
    with pytest.raises(ValueError, match="unknown video task"):
        get_video_task("which_frames")
    with pytest.raises(ValueError, match="unknown video task"):
        make_video_sample("read_cell", "train", 0)
    with pytest.raises(ValueError, match="no knob"):
        get_video_task("which_frame", fps=4)
    with pytest.raises(ValueError, match="shapes must be in 2..3"):
        get_video_task("what_changed", shapes=4)
    with pytest.raises(ValueError, match="shapes must be at least 2"):
        get_video_task("count_frames", shapes=1)
    with pytest.raises(ValueError, match="do not fit"):
        make_video_sample(get_video_task("which_frame", shapes=40), "train", 0)
    with pytest.raises(ValueError, match="32 to 4096 px a side"):
        make_video_sample("which_frame", "train", 0, size=(16, 16))
    with pytest.raises(ValueError, match="unknown split"):
        make_video_sample("which_frame", "dev", 0)
    assert get_video_task("which_frame", frames=3).frames == 3

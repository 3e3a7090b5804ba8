"""Synthetic video tasks: short clips of frames rendered offline, with questions that need time.

The image tasks (`visor.data.tasks`) ask about one picture; these ask about a clip of `frames` pictures of one
size, and each hard task needs more than one frame: the frame a named shape appears in (`which_frame`), how many
frames show it (`count_frames`), which shape changed colour between the first and the last frame
(`what_changed`). Their shapes are small (a few percent of a frame), as the image suite's hard tasks hinge on
small regions; the easy task (`dominant_color_video`) is carried by a large moving shape that every frame shows,
so any one frame answers it (foreground-carried, as the image suite's easy tasks are, for the same reason).

The design is the image suite's: a task is a frozen dataclass of knobs (the number of frames among them),
`make_scene` draws plain data and the scene renders its frames; sample `index` of a split is a pure function of
(seed, split, task, index) (`Task.make`), splits draw from disjoint seed streams, and every answer is one word of
the shared set (digits, colour and shape words). Tests edit scenes to show that the answers depend on time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from visor.data.render import CLASS_ID, COLORS, DIGITS, SHAPES, Canvas, draw_shape
from visor.data.tasks import Task, generate_split, with_knobs

VIDEO_SIZE = (64, 64)  # (height, width) of a frame: one tiny-preset crop, so a frame is never resized
MAX_FRAMES = 64  # frames a clip: far beyond what the tasks need; it bounds the memory one sample takes

Shape = tuple[str, tuple[float, float, float, float], str]  # (kind, box in frame fractions, colour)


@dataclass(frozen=True)
class VideoSample:
    """One question about a clip: `frames` are RGB images of one size, in time order."""

    frames: tuple[Image.Image, ...]
    question: str
    answer: str
    task: str
    group: str


class VideoTask(Task):
    """Base of the video tasks: a clip of `frames` frames (a knob each subclass declares), at least `min_frames`
    (what the question needs) and at most `max_frames`."""

    min_frames: ClassVar[int] = 1
    max_frames: ClassVar[int] = MAX_FRAMES
    frames_reason: ClassVar[str] = "at least one; the cap bounds the memory a sample takes"
    frames: int

    def __post_init__(self):
        if not self.min_frames <= self.frames <= self.max_frames:
            raise ValueError(f"{self.name}: frames must be in {self.min_frames}..{self.max_frames} "
                             f"({self.frames_reason}), got {self.frames}")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> VideoSample:
        scene = self.make_scene(rng, height, width)
        return VideoSample(scene.render(), scene.question, scene.answer, self.name, self.group)


@dataclass(frozen=True)
class Clip:
    """Frames of filled shapes on paper, each drawn in order; subclasses say what is asked about them."""

    height: int
    width: int
    frames: tuple[tuple[Shape, ...], ...]

    def canvases(self) -> list[Canvas]:
        canvases = []
        for shapes in self.frames:
            canvas = Canvas(self.height, self.width)
            for kind, (x0, y0, x1, y1), color in shapes:
                draw_shape(canvas, kind, (x0 * self.width, y0 * self.height, x1 * self.width, y1 * self.height),
                           color, color)
            canvases.append(canvas)
        return canvases

    def render(self) -> tuple[Image.Image, ...]:
        return tuple(canvas.image for canvas in self.canvases())


def _square(side: float, x: float, y: float, height: int, width: int) -> tuple[float, float, float, float]:
    """A box `side` px square with its top-left corner at (x, y) px, in frame fractions (circles stay round)."""
    return x / width, y / height, (x + side) / width, (y + side) / height


# --------------------------------------------------------------------------------------------------- hard tasks


@dataclass(frozen=True)
class TargetClip(Clip):
    """Frames of small shapes; the question is about one (colour, kind), the target."""

    target: tuple[str, str]  # (colour, kind)

    def shows(self, frame: int) -> bool:
        return any((color, kind) == self.target for kind, _, color in self.frames[frame])


@dataclass(frozen=True)
class WhichFrameClip(TargetClip):
    @property
    def question(self) -> str:
        return f"in which frame is the {self.target[0]} {self.target[1]} ?"

    @property
    def answer(self) -> str:
        showing = [frame for frame in range(len(self.frames)) if self.shows(frame)]
        if len(showing) != 1:
            raise ValueError(f"which_frame: the {' '.join(self.target)} must be in exactly one frame, "
                             f"it is in {len(showing)}")
        return str(showing[0] + 1)


@dataclass(frozen=True)
class CountFramesClip(TargetClip):
    @property
    def question(self) -> str:
        return f"in how many frames is there a {self.target[0]} {self.target[1]} ?"

    @property
    def answer(self) -> str:
        return str(sum(self.shows(frame) for frame in range(len(self.frames))))


def _other(rng: np.random.Generator, options: tuple[str, ...], value: str) -> str:
    """One of `options` other than `value`, uniformly."""
    return options[(options.index(value) + 1 + int(rng.integers(len(options) - 1))) % len(options)]


def _layout(rng: np.random.Generator, count: int, side: float, height: int, width: int) -> list:
    """`count` boxes `side` px square on distinct cells of a lattice 1.5 boxes wide, so shapes never touch."""
    cols, rows = int(width // (1.5 * side)), int(height // (1.5 * side))
    if rows * cols < count:
        raise ValueError(f"{count} shapes {side:.0f} px wide do not fit a {height}x{width} frame")
    cell_w, cell_h = width / cols, height / rows
    boxes = []
    for cell, (jx, jy) in zip(rng.permutation(rows * cols)[:count], rng.uniform(0, 1, size=(count, 2))):
        x, y = (cell % cols) * cell_w + jx * (cell_w - side), (cell // cols) * cell_h + jy * (cell_h - side)
        boxes.append(_square(side, x, y, height, width))
    return boxes


@dataclass(frozen=True)
class TargetTask(VideoTask):
    """Frames of `shapes` small shapes each, freshly placed. Every frame holds one shape of the target's colour and
    one of its kind: the same shape (the target) in the frames that show it, two lures in the others; the rest
    share neither. Counting shapes, or shapes of its colour, or of its kind, tells nothing: only one shape's colour
    and kind together do."""

    min_frames: ClassVar[int] = 2
    max_frames: ClassVar[int] = 9
    frames_reason: ClassVar[str] = "frames with and without the target; answers are one digit"

    frames: int = 8
    shapes: int = 4  # per frame: the target or its two lures, and shapes sharing neither its colour nor its kind
    object_size: float = 0.16  # shape side / short frame side (10 px at 64 px: 2.5% of the frame)

    def __post_init__(self):
        super().__post_init__()
        if self.shapes < 2:
            raise ValueError(f"{self.name}: shapes must be at least 2 (the target's two lures), got {self.shapes}")

    def clip_frames(self, rng, height, width, target, showing) -> tuple[tuple[Shape, ...], ...]:
        side, (color, kind) = self.object_size * min(height, width), target
        frames = []
        for frame in range(self.frames):
            objects = [target] if frame in showing else [(color, _other(rng, SHAPES, kind)),
                                                         (_other(rng, COLORS, color), kind)]
            while len(objects) < self.shapes:
                objects.append((_other(rng, COLORS, color), _other(rng, SHAPES, kind)))
            boxes = _layout(rng, len(objects), side, height, width)
            frames.append(tuple((shape, box, ink) for (ink, shape), box in zip(objects, boxes)))
        return tuple(frames)

    @staticmethod
    def draw_target(rng) -> tuple[str, str]:
        return COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]


@dataclass(frozen=True)
class WhichFrame(TargetTask):
    """Temporal grounding: the one frame (1..N) in which a named small shape appears, its lures in the others."""

    name: ClassVar[str] = "which_frame"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS[1:]
    description: ClassVar[str] = "video: the frame (1-N) showing a named small shape, its lures in the others"

    def make_scene(self, rng, height, width) -> WhichFrameClip:
        target = self.draw_target(rng)
        showing = {int(rng.integers(self.frames))}
        return WhichFrameClip(height, width, self.clip_frames(rng, height, width, target, showing), target)


@dataclass(frozen=True)
class CountFrames(TargetTask):
    """Counting across time: how many frames (0..N, uniformly) show a named small shape."""

    name: ClassVar[str] = "count_frames"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS
    description: ClassVar[str] = "video: in how many frames (0-N) a named small shape appears"

    def make_scene(self, rng, height, width) -> CountFramesClip:
        target = self.draw_target(rng)
        showing = set(rng.permutation(self.frames)[: int(rng.integers(self.frames + 1))].tolist())
        return CountFramesClip(height, width, self.clip_frames(rng, height, width, target, showing), target)


@dataclass(frozen=True)
class ChangeClip(Clip):
    """Shapes of distinct kinds, listed in the same order in every frame; one changes colour on the way."""

    @property
    def question(self) -> str:
        return "which shape changed color ?"

    @property
    def answer(self) -> str:
        changed = [kind for (kind, _, first), (_, _, last) in zip(self.frames[0], self.frames[-1]) if first != last]
        if len(changed) != 1:
            raise ValueError(f"what_changed: exactly one shape must change colour, {len(changed)} do")
        return changed[0]


@dataclass(frozen=True)
class WhatChanged(VideoTask):
    """First against last frame: small shapes of distinct kinds and colours glide across the frame, and from one
    frame on one of them takes a colour no shape had. Any one frame shows shapes of distinct colours only, so
    only comparing frames tells which one changed; the motion is irrelevant to the answer."""

    name: ClassVar[str] = "what_changed"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = SHAPES
    description: ClassVar[str] = "video: which of a few small moving shapes changed colour between first and last frame"
    min_frames: ClassVar[int] = 2
    frames_reason: ClassVar[str] = "a first and a last frame to compare"

    frames: int = 8
    shapes: int = 3  # 2 or 3: distinct kinds, so the answer names one
    object_size: float = 0.16  # shape side / short frame side
    motion: float = 0.5  # largest horizontal travel over the clip, in frame widths

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.shapes <= len(SHAPES):
            raise ValueError(f"what_changed: shapes must be in 2..{len(SHAPES)} (distinct kinds), got {self.shapes}")

    def make_scene(self, rng, height, width) -> ChangeClip:
        side = self.object_size * min(height, width)
        band = height / self.shapes  # each shape glides along its own horizontal band, so none hides another
        if side > band:
            raise ValueError(f"what_changed: {self.shapes} shapes {side:.0f} px high do not fit a frame "
                             f"{height} px high")
        kinds = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[: self.shapes]]
        colors = [COLORS[int(i)] for i in rng.permutation(len(COLORS))[: self.shapes + 1]]  # the last one is new
        changer, change_at = int(rng.integers(self.shapes)), int(rng.integers(1, self.frames))
        tracks = []
        for index in range(self.shapes):
            start = rng.uniform(0, width - side)
            end = np.clip(start + rng.uniform(-self.motion, self.motion) * width, 0, width - side)
            y = index * band + rng.uniform(0, band - side)
            tracks.append([_square(side, x, y, height, width) for x in np.linspace(start, end, self.frames)])
        frames = tuple(
            tuple((kind, track[frame], colors[-1] if index == changer and frame >= change_at else colors[index])
                  for index, (kind, track) in enumerate(zip(kinds, tracks)))
            for frame in range(self.frames))
        return ChangeClip(height, width, frames)


# --------------------------------------------------------------------------------------------------- easy task


@dataclass(frozen=True)
class MainColorClip(Clip):
    main: str

    @property
    def question(self) -> str:
        return "what is the main color ?"

    @property
    def answer(self) -> str:
        return self.main


def _glide(rng: np.random.Generator, low: float, high: float, kind: str, frames: int) -> list:
    """Boxes of one size, sides in [low, high] (frame fractions), moving in a straight line from one uniform
    position to another over `frames` frames (square boxes for circles, so they stay round in square frames)."""
    w, h = rng.uniform(low, high, size=2)
    if kind == "circle":
        h = w
    (x0, y0), (x1, y1) = rng.uniform(0, 1, size=(2, 2)) * (1 - w, 1 - h)
    return [(float(x), float(y), float(x + w), float(y + h))
            for x, y in zip(np.linspace(x0, x1, frames), np.linspace(y0, y1, frames))]


@dataclass(frozen=True)
class DominantColorVideo(VideoTask):
    """The colour covering most of the foreground in every frame: a large moving shape, smaller moving ones of
    other colours. No time is needed: any one frame answers it."""

    name: ClassVar[str] = "dominant_color_video"
    group: ClassVar[str] = "easy"
    answers: ClassVar[tuple[str, ...]] = COLORS
    description: ClassVar[str] = "video: the colour covering most of the moving shapes in every frame"

    frames: int = 8
    distractors: int = 3  # smaller shapes in other colours

    def make_scene(self, rng, height, width) -> MainColorClip:
        # Redraw until the main colour covers at least twice the area of any other in every frame.
        while True:
            order = rng.permutation(len(COLORS))
            main, others = COLORS[order[0]], [COLORS[i] for i in order[1:]]
            kind = SHAPES[rng.integers(len(SHAPES))]
            tracks = [(kind, _glide(rng, 0.45, 0.75, kind, self.frames), main)]
            for i in range(self.distractors):
                small = SHAPES[rng.integers(len(SHAPES))]
                tracks.append((small, _glide(rng, 0.1, 0.25, small, self.frames), others[i % len(others)]))
            frames = tuple(tuple((shape, boxes[frame], color) for shape, boxes, color in tracks)
                           for frame in range(self.frames))
            scene = MainColorClip(height, width, frames, main)
            if all(_dominates(canvas, main, others) for canvas in scene.canvases()):
                return scene


def _dominates(canvas: Canvas, main: str, others: list[str]) -> bool:
    areas = np.bincount(canvas.class_map().ravel(), minlength=len(CLASS_ID))
    return all(areas[CLASS_ID[main]] >= 2 * areas[CLASS_ID[color]] for color in others)


# ------------------------------------------------------------------------------------------------- registry

VIDEO_TASKS: dict[str, VideoTask] = {task.name: task for task in (WhichFrame(), CountFrames(), WhatChanged(),
                                                                   DominantColorVideo())}


def get_video_task(name: str, **knobs) -> VideoTask:
    """The registered video task `name`, with knobs overridden (e.g. `get_video_task("which_frame", frames=4)`)."""
    if name not in VIDEO_TASKS:
        raise ValueError(f"unknown video task {name!r}; choose one of {', '.join(VIDEO_TASKS)}")
    return with_knobs(VIDEO_TASKS[name], **knobs)


def make_video_sample(task: str | VideoTask, split: str, index: int, seed: int = 0,
                      size: tuple[int, int] = VIDEO_SIZE) -> VideoSample:
    """Sample `index` of `split` for one video task, frames of `size` (height, width): a pure function of its
    arguments."""
    task = get_video_task(task) if isinstance(task, str) else task
    return task.make(split, index, seed, size)


def generate_video_split(split: str, count: int, seed: int = 0, tasks: list[str | VideoTask] | None = None,
                         size: tuple[int, int] = VIDEO_SIZE, start: int = 0) -> list[VideoSample]:
    """Samples `start .. start+count` of a split, cycling through `tasks` (all video tasks by default), as
    `visor.data.tasks.generate_split` does for images."""
    tasks = [get_video_task(t) if isinstance(t, str) else t for t in (tasks or list(VIDEO_TASKS))]
    return generate_split(split, count, seed, tasks, size, start)


__all__ = [
    "MAX_FRAMES", "VIDEO_SIZE", "VIDEO_TASKS", "VideoSample", "VideoTask", "WhichFrame", "CountFrames",
    "WhatChanged", "DominantColorVideo", "get_video_task", "make_video_sample", "generate_video_split",
]

"""The synthetic task suite: fine-grained ("hard") and coarse ("easy") visual questions, rendered offline.

VISOR's claim is that dropping visual tokens hurts fine-grained tasks (documents, charts, OCR) and sparse
interaction does not. The hard tasks here hinge on a region of a few percent of the image or less (one grid cell,
one bar, a few 4-px marks); the easy ones are carried by large foreground objects and survive 4x downsampling.
(Easy tasks are foreground-carried on purpose: saliency-based pruning can lose background colour, which would
mix the two groups.)

Every answer is one word from a small shared set (digits, colour words, shape words, yes/no), so a tiny model can
learn it with the tiny word-level tokenizer. Sample `index` of a split is a pure function of
(seed, split, task, index): the same arguments give the same bytes, and splits draw from disjoint seed streams.

A task is a frozen dataclass of difficulty knobs; `make_scene` draws a scene (plain data) and the scene renders
itself. Tests edit scenes to show which pixels an answer depends on.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from visor.data.render import CLASS_ID, COLORS, DIGITS, INK, PALETTE, RULE, SHAPES, Canvas, draw_shape

SPLITS = ("train", "validation", "test")
DEFAULT_SIZE = (128, 128)  # (height, width): the tiny preset's largest pinpoint, 2x2 crops of 64 px, no resize
GROUPS = ("hard", "easy")
MAX_SIDE = 4096  # px a side: far beyond what the tasks need; it bounds the memory one sample takes


@dataclass(frozen=True)
class Sample:
    """One visual question. `class_map` is the (H, W) int16 per-pixel class (render.PATCH_CLASSES), or None."""

    image: Image.Image
    question: str
    answer: str
    task: str
    group: str
    class_map: np.ndarray | None = None


class Task:
    """Base of the synthetic tasks: subclasses set the class attributes and implement `make_scene`."""

    name: ClassVar[str]
    group: ClassVar[str]
    answers: ClassVar[tuple[str, ...]]
    description: ClassVar[str]

    def make_scene(self, rng: np.random.Generator, height: int, width: int):
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, height: int, width: int) -> Sample:
        scene = self.make_scene(rng, height, width)
        canvas = scene.render()
        return Sample(canvas.image, scene.question, scene.answer, self.name, self.group, canvas.class_map())

    def make(self, split: str, index: int, seed: int, size: tuple[int, int]) -> Sample:
        """Sample `index` of `split`, drawn from its own seed stream (see `sample_seed`)."""
        height, width = size
        if min(height, width) < 32 or max(height, width) > MAX_SIDE:
            raise ValueError(f"synthetic images must be 32 to {MAX_SIDE} px a side (at least 32 to stay legible), "
                             f"got {height}x{width}")
        rng = np.random.default_rng(np.random.SeedSequence(sample_seed(seed, split, self.name, index)))
        return self.sample(rng, height, width)


# --------------------------------------------------------------------------------------------------- hard tasks


@dataclass(frozen=True)
class GridScene:
    height: int
    width: int
    digits: tuple[tuple[int, ...], ...]  # rows x cols
    target: tuple[int, int]  # (row, col), 0-based
    jitter: tuple[tuple[tuple[float, float], ...], ...]  # per-cell glyph offset, in cell fractions
    glyph_scale: float
    specks: tuple[tuple[float, float], ...]  # clutter dots, in image fractions
    ink: str | None = None  # pointer "ink": the target digit is drawn in this colour, the others in black

    def cell_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        rows, cols = len(self.digits), len(self.digits[0])
        margin = 0.05 * min(self.height, self.width)
        cell_w, cell_h = (self.width - 2 * margin) / cols, (self.height - 2 * margin) / rows
        x0, y0 = margin + col * cell_w, margin + row * cell_h
        return x0, y0, x0 + cell_w, y0 + cell_h

    def render(self) -> Canvas:
        canvas = Canvas(self.height, self.width)
        rows, cols = len(self.digits), len(self.digits[0])
        for row in range(rows):
            for col in range(cols):
                canvas.rectangle(self.cell_box(row, col), fill=None, cls=str(self.digits[row][col]), outline=RULE)
        speck = max(1.0, 0.008 * min(self.height, self.width))
        for fx, fy in self.specks:
            x, y = fx * self.width, fy * self.height
            canvas.ellipse((x - speck, y - speck, x + speck, y + speck), fill=RULE)
        for row in range(rows):
            for col in range(cols):
                x0, y0, x1, y1 = self.cell_box(row, col)
                dx, dy = self.jitter[row][col]
                size = round(self.glyph_scale * min(x1 - x0, y1 - y0))
                center = ((x0 + x1) / 2 + dx * (x1 - x0), (y0 + y1) / 2 + dy * (y1 - y0))
                self.draw_cell(canvas, row, col, center, size)
        return canvas

    def draw_cell(self, canvas: Canvas, row: int, col: int, center: tuple[float, float], size: int) -> None:
        """The cell's glyph: its digit, in the pointer colour if it is the target, else in black."""
        ink = PALETTE[self.ink] if self.ink and (row, col) == self.target else INK
        canvas.text(center, str(self.digits[row][col]), size, fill=ink)

    @property
    def question(self) -> str:
        if self.ink:
            return f"what is the {self.ink} digit ?"
        return f"what digit is in row {self.target[0] + 1} column {self.target[1] + 1} ?"

    @property
    def answer(self) -> str:
        return str(self.digits[self.target[0]][self.target[1]])


@dataclass(frozen=True)
class ReadCell(Task):
    """Read the digit in a named cell of a rendered page grid (document/OCR-like)."""

    name: ClassVar[str] = "read_cell"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS
    description: ClassVar[str] = "the digit in row R column C of a grid of digits"

    rows: int = 6  # at most 9: rows and columns are named by one digit
    cols: int = 6
    glyph_scale: float = 0.6  # glyph height / cell side
    clutter: float = 0.5  # grey specks per cell
    pointer: str = "position"  # how the question names the cell: "position" (row R column C) or "ink" (its colour)

    def __post_init__(self):
        if not (1 <= self.rows <= 9 and 1 <= self.cols <= 9):
            raise ValueError(f"read_cell: rows and cols must be in 1..9, got {self.rows}x{self.cols}")
        if self.pointer not in ("position", "ink"):
            raise ValueError(f"read_cell: pointer must be 'position' or 'ink', got {self.pointer!r}")

    def make_scene(self, rng, height, width) -> GridScene:
        digits = rng.integers(0, 10, size=(self.rows, self.cols))
        jitter = rng.uniform(-0.12, 0.12, size=(self.rows, self.cols, 2))
        specks = rng.uniform(0, 1, size=(int(self.clutter * self.rows * self.cols), 2))
        return GridScene(
            height, width,
            digits=tuple(tuple(int(d) for d in row) for row in digits),
            target=(int(rng.integers(self.rows)), int(rng.integers(self.cols))),
            jitter=tuple(tuple((float(x), float(y)) for x, y in row) for row in jitter),
            glyph_scale=self.glyph_scale,
            specks=tuple((float(x), float(y)) for x, y in specks),
            ink=COLORS[int(rng.integers(len(COLORS)))] if self.pointer == "ink" else None,
        )


@dataclass(frozen=True)
class KeyGridScene(GridScene):
    """A grid where a few digits are drawn in distinct colours and one cell holds a coloured circle, the key:
    the question asks for the digit drawn in the key's colour. The answer is read from `key` and `inks`, not
    from the inherited `target` (which `KeyDigit` sets to that cell, and which a scene edited by hand may leave
    behind)."""

    inks: tuple[tuple[int, int, str], ...] = ()  # (row, col, colour) of each coloured digit, the target's included
    key: tuple[int, int, str] = (0, 0, "red")  # (row, col, colour) of the circle

    def draw_cell(self, canvas, row, col, center, size) -> None:
        key_row, key_col, key_color = self.key
        if (row, col) == (key_row, key_col):
            half = size / 2
            box = (center[0] - half, center[1] - half, center[0] + half, center[1] + half)
            draw_shape(canvas, "circle", box, key_color, key_color)
            return
        ink = next((PALETTE[color] for r, c, color in self.inks if (r, c) == (row, col)), INK)
        canvas.text(center, str(self.digits[row][col]), size, fill=ink)

    @property
    def question(self) -> str:
        return "what digit is the color of the circle ?"

    @property
    def answer(self) -> str:
        """The digit inked in the key's colour (the colours are distinct, so there is one)."""
        row, col = next((r, c) for r, c, color in self.inks if color == self.key[2])
        return str(self.digits[row][col])


@dataclass(frozen=True)
class KeyDigit(Task):
    """Two hops: read the circle's colour, then the digit drawn in that colour among digits in other colours.

    `read_cell` with `pointer="ink"` is the one-hop version (the colour is in the question). A model that reads
    the image once per layer that attends to it needs two such reads, or a bound colour-and-digit code, here:
    with the vision tower fixed, VISOR's CA-only configuration cannot answer it and the policy spends
    self-attention layers on it (docs/two-hop)."""

    name: ClassVar[str] = "key_digit"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS
    description: ClassVar[str] = "the digit drawn in the colour of a circle, among digits in other colours"

    rows: int = 3
    cols: int = 3
    glyph_scale: float = 0.7
    clutter: float = 0.5
    inks: int = 3  # coloured digits, in distinct colours; one has the key's colour

    def __post_init__(self):
        if not (1 <= self.rows <= 9 and 1 <= self.cols <= 9) or self.rows * self.cols < self.inks + 1:
            raise ValueError(f"key_digit: a {self.rows}x{self.cols} grid (1..9 each) must hold {self.inks} coloured "
                             "digits and the key")
        if not 1 <= self.inks <= len(COLORS):
            raise ValueError(f"key_digit: inks must be in 1..{len(COLORS)} (distinct colours), got {self.inks}")

    def make_scene(self, rng, height, width) -> KeyGridScene:
        digits = rng.integers(0, 10, size=(self.rows, self.cols))
        jitter = rng.uniform(-0.12, 0.12, size=(self.rows, self.cols, 2))
        specks = rng.uniform(0, 1, size=(int(self.clutter * self.rows * self.cols), 2))
        cells = [divmod(int(i), self.cols) for i in rng.permutation(self.rows * self.cols)[: self.inks + 1]]
        colors = [COLORS[int(i)] for i in rng.permutation(len(COLORS))[: self.inks]]
        (key_row, key_col), targets = cells[0], cells[1:]
        return KeyGridScene(
            height, width,
            digits=tuple(tuple(int(d) for d in row) for row in digits),
            target=targets[0],
            jitter=tuple(tuple((float(x), float(y)) for x, y in row) for row in jitter),
            glyph_scale=self.glyph_scale,
            specks=tuple((float(x), float(y)) for x, y in specks),
            inks=tuple((r, c, color) for (r, c), color in zip(targets, colors)),
            key=(key_row, key_col, colors[0]),
        )


@dataclass(frozen=True)
class BarScene:
    height: int
    width: int
    colors: tuple[str, ...]
    values: tuple[int, ...]
    target: int
    bar_width: float

    def _plot(self) -> tuple[float, float, float, float]:
        """Plot area (left, top, right, baseline)."""
        return 0.14 * self.width, 0.06 * self.height, 0.97 * self.width, 0.86 * self.height

    def column_box(self, index: int) -> tuple[float, float, float, float]:
        """The box a bar of any value 0..9 can occupy."""
        left, top, right, base = self._plot()
        slot = (right - left) / len(self.values)
        x0 = left + index * slot + slot * (1 - self.bar_width) / 2
        return x0, base - 9 * (base - top) / 10, x0 + slot * self.bar_width, base

    def render(self) -> Canvas:
        canvas = Canvas(self.height, self.width)
        left, top, right, base = self._plot()
        unit = (base - top) / 10
        label = max(5, round(0.9 * unit))
        for tick in range(10):
            y = base - tick * unit
            canvas.line([(left, y), (right, y)], fill=RULE if tick else INK)
            canvas.text((left / 2, y), str(tick), label)
        canvas.line([(left, top), (left, base)], fill=INK)
        for index, (color, value) in enumerate(zip(self.colors, self.values)):
            x0, _, x1, _ = self.column_box(index)
            if value:
                canvas.rectangle((x0, base - value * unit, x1, base), fill=PALETTE[color], cls=str(value))
            swatch = 0.6 * (self.height - base)
            canvas.rectangle((x0, base + 0.2 * swatch, x1, base + swatch), fill=PALETTE[color], cls=color)
        return canvas

    @property
    def question(self) -> str:
        return f"what is the value of the {self.colors[self.target]} bar ?"

    @property
    def answer(self) -> str:
        return str(self.values[self.target])


@dataclass(frozen=True)
class BarValue(Task):
    """Read one bar's value (0-9) off the y axis of a rendered bar chart (ChartQA-like); bars named by colour."""

    name: ClassVar[str] = "bar_value"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS
    description: ClassVar[str] = "the value 0-9 of the bar of a named colour, read against the y axis"

    num_bars: int = 6  # at most len(COLORS): bars have distinct colours
    bar_width: float = 0.4  # bar width / slot width

    def __post_init__(self):
        if not 1 <= self.num_bars <= len(COLORS):
            raise ValueError(f"bar_value: num_bars must be in 1..{len(COLORS)}, got {self.num_bars}")

    def make_scene(self, rng, height, width) -> BarScene:
        colors = tuple(COLORS[i] for i in rng.permutation(len(COLORS))[: self.num_bars])
        values = tuple(int(v) for v in rng.integers(0, 10, size=self.num_bars))
        return BarScene(height, width, colors, values, int(rng.integers(self.num_bars)), self.bar_width)


@dataclass(frozen=True)
class MarksScene:
    height: int
    width: int
    marks: tuple[tuple[float, float, str], ...]  # (x, y) centre in image fractions, colour ("gray" = clutter)
    mark_size: float  # side in fractions of the short image side
    target: str

    def mark_box(self, index: int) -> tuple[float, float, float, float]:
        fx, fy, _ = self.marks[index]
        half = self.mark_size * min(self.height, self.width) / 2
        x, y = fx * self.width, fy * self.height
        return x - half, y - half, x + half, y + half

    def render(self) -> Canvas:
        canvas = Canvas(self.height, self.width)
        for index, (_, _, color) in enumerate(self.marks):
            if color == "gray":
                canvas.rectangle(self.mark_box(index), fill=RULE)
            else:
                canvas.rectangle(self.mark_box(index), fill=PALETTE[color], cls=color)
        return canvas

    @property
    def question(self) -> str:
        return f"how many {self.target} marks are there ?"

    @property
    def answer(self) -> str:
        return str(sum(color == self.target for _, _, color in self.marks))


@dataclass(frozen=True)
class CountMarks(Task):
    """Count the small marks of one colour among marks of other colours and grey clutter."""

    name: ClassVar[str] = "count_marks"
    group: ClassVar[str] = "hard"
    answers: ClassVar[tuple[str, ...]] = DIGITS
    description: ClassVar[str] = "how many small marks of a named colour (0-9) there are"

    num_colors: int = 3  # colours present (the asked one included)
    mark_size: float = 0.03  # side / short image side (4 px at 128 px)
    clutter: int = 8  # grey marks
    max_count: int = 9  # marks of each colour: 0..max_count

    def __post_init__(self):
        if not 1 <= self.num_colors <= len(COLORS):
            raise ValueError(f"count_marks: num_colors must be in 1..{len(COLORS)}, got {self.num_colors}")
        if not 1 <= self.max_count <= 9:
            raise ValueError(f"count_marks: max_count must be in 1..9 (one-digit answers), got {self.max_count}")

    def make_scene(self, rng, height, width) -> MarksScene:
        colors = [COLORS[i] for i in rng.permutation(len(COLORS))[: self.num_colors]]
        counts = rng.integers(0, self.max_count + 1, size=self.num_colors)
        labels = [c for c, n in zip(colors, counts) for _ in range(n)] + ["gray"] * self.clutter
        # Marks sit on distinct cells of a lattice three marks wide, so they never touch.
        spacing = 3 * self.mark_size * min(height, width)
        cols, rows = max(1, int(width // spacing)), max(1, int(height // spacing))
        if rows * cols < len(labels):
            raise ValueError(f"count_marks: {len(labels)} marks do not fit a {height}x{width} image at this mark size")
        cells = rng.permutation(rows * cols)[: len(labels)]
        jitter = rng.uniform(0.35, 0.65, size=(len(labels), 2))
        marks = tuple(
            (float((cell % cols + jx) / cols), float((cell // cols + jy) / rows), label)
            for cell, (jx, jy), label in zip(cells, jitter, rng.permutation(labels))
        )
        return MarksScene(height, width, marks, self.mark_size, colors[0])


# --------------------------------------------------------------------------------------------------- easy tasks


@dataclass(frozen=True)
class ShapesScene:
    """Filled shapes drawn in order; `question` and `answer` are set by the task that drew the scene."""

    height: int
    width: int
    shapes: tuple[tuple[str, tuple[float, float, float, float], str, str], ...]  # (kind, box in fractions, colour, class)
    question: str
    answer: str

    def render(self) -> Canvas:
        canvas = Canvas(self.height, self.width)
        for kind, (x0, y0, x1, y1), color, cls in self.shapes:
            box = (x0 * self.width, y0 * self.height, x1 * self.width, y1 * self.height)
            draw_shape(canvas, kind, box, color, cls)
        return canvas


def _random_box(rng: np.random.Generator, low: float, high: float, kind: str) -> tuple[float, float, float, float]:
    """A box for a shape of `kind`, sides in [low, high] (image fractions), placed uniformly inside the image.

    Circles get square boxes (in fractions, so they stay round in square images)."""
    w, h = rng.uniform(low, high, size=2)
    if kind == "circle":
        h = w
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return float(x0), float(y0), float(x0 + w), float(y0 + h)


@dataclass(frozen=True)
class DominantColor(Task):
    """Name the colour that covers most of the foreground: big shapes of one colour, smaller ones of others."""

    name: ClassVar[str] = "dominant_color"
    group: ClassVar[str] = "easy"
    answers: ClassVar[tuple[str, ...]] = COLORS
    description: ClassVar[str] = "the colour covering most of the drawn shapes (at least twice any other)"

    distractors: int = 3  # smaller shapes in other colours

    def make_scene(self, rng, height, width) -> ShapesScene:
        # Redraw until the dominant colour covers at least twice the area of any other (checked on the class map).
        while True:
            order = rng.permutation(len(COLORS))
            main, others = COLORS[order[0]], [COLORS[i] for i in order[1:]]
            kind = SHAPES[rng.integers(3)]
            shapes = [(kind, _random_box(rng, 0.45, 0.75, kind), main, main)]
            for i in range(self.distractors):
                color, small = others[i % len(others)], SHAPES[rng.integers(3)]
                shapes.append((small, _random_box(rng, 0.1, 0.25, small), color, color))
            scene = ShapesScene(height, width, tuple(shapes), "what is the main color ?", main)
            areas = np.bincount(scene.render().class_map().ravel(), minlength=len(CLASS_ID))
            if all(areas[CLASS_ID[main]] >= 2 * areas[CLASS_ID[c]] for c in others):
                return scene


@dataclass(frozen=True)
class HasShape(Task):
    """Is there a large shape of a named kind? One large shape plus small distractors of the other kinds."""

    name: ClassVar[str] = "has_shape"
    group: ClassVar[str] = "easy"
    answers: ClassVar[tuple[str, ...]] = ("yes", "no")
    description: ClassVar[str] = "whether the one large shape (circle, rectangle or triangle) is of a named kind"

    distractors: int = 3  # small shapes, never larger than a sixth of the short side

    def make_scene(self, rng, height, width) -> ShapesScene:
        kind = SHAPES[rng.integers(3)]
        color, *others = (COLORS[i] for i in rng.permutation(len(COLORS)))
        # Half the questions name the large shape's kind (yes); the rest name another kind (no).
        asked = kind if rng.random() < 0.5 else SHAPES[(SHAPES.index(kind) + 1 + rng.integers(2)) % 3]
        # Distractors first, so the large shape is drawn whole on top of them.
        shapes = []
        for i in range(self.distractors):
            small = SHAPES[rng.integers(3)]
            shapes.append((small, _random_box(rng, 0.06, 0.16, small), others[i % len(others)], others[i % len(others)]))
        shapes.append((kind, _random_box(rng, 0.5, 0.85, kind), color, kind))
        return ShapesScene(height, width, tuple(shapes), f"is there a large {asked} ?", "yes" if asked == kind else "no")


# ------------------------------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {task.name: task for task in (ReadCell(), KeyDigit(), BarValue(), CountMarks(),
                                                        DominantColor(), HasShape())}


def get_task(name: str, **knobs) -> Task:
    """The registered task `name`, with difficulty knobs overridden (e.g. `get_task("read_cell", rows=8)`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return with_knobs(TASKS[name], **knobs)


def with_knobs(task: Task, **knobs) -> Task:
    """`task` with difficulty knobs overridden; a ValueError names the knobs it has when one is not among them."""
    try:
        return dataclasses.replace(task, **knobs)
    except TypeError as error:
        knob_names = [f.name for f in dataclasses.fields(task)]
        raise ValueError(f"task {task.name!r} has no knob among {sorted(knobs)}; its knobs are {knob_names}") from error


def task_names(group: str | None = None) -> list[str]:
    """Registered task names, optionally of one group ("hard" or "easy")."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {GROUPS}")
    return [name for name, task in TASKS.items() if group is None or task.group == group]


def sample_seed(seed: int, split: str, task: str, index: int) -> tuple[int, int, int, int]:
    """The entropy of one sample. The split id is part of it, so splits draw from disjoint seed streams."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return seed, SPLITS.index(split), zlib.crc32(task.encode()), index


def make_sample(task: str | Task, split: str, index: int, seed: int = 0,
                size: tuple[int, int] = DEFAULT_SIZE) -> Sample:
    """Sample `index` of `split` for one task: a pure function of its arguments."""
    task = get_task(task) if isinstance(task, str) else task
    return task.make(split, index, seed, size)


def generate_split(split: str, count: int, seed: int = 0, tasks: list[str | Task] | None = None,
                   size: tuple[int, int] = DEFAULT_SIZE, start: int = 0) -> list[Sample]:
    """Samples `start .. start+count` of a split, cycling through `tasks` (all registered tasks by default).

    Sample i belongs to task i mod len(tasks), and is that task's sample i // len(tasks).
    """
    tasks = [get_task(t) if isinstance(t, str) else t for t in (tasks or list(TASKS))]
    return [make_sample(tasks[i % len(tasks)], split, i // len(tasks), seed, size)
            for i in range(start, start + count)]


__all__ = [
    "DEFAULT_SIZE", "GROUPS", "SPLITS", "TASKS", "Sample", "Task", "ReadCell", "KeyDigit", "BarValue", "CountMarks",
    "DominantColor", "HasShape", "get_task", "with_knobs", "task_names", "sample_seed", "make_sample", "generate_split",
]

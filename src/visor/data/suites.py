"""Named task suites: which tasks, with which difficulty knobs, at which image size.

A suite is what a data spec, a label table and the demo agree on, so a model trained on one is evaluated on the
same distribution everywhere. These are built in:

- `standard`: every registered task at its default knobs, 128x128 px images (five 64-px crop views, 336
  visual tokens on the tiny preset): the suite's full difficulty.
- `demo`: tasks made small enough for a from-scratch tiny model to learn on a 2-core CPU in well under an
  hour: 64x64 px images (two 64-px views, 136 visual tokens); the digit written in colour among a 3x3 grid of
  black digits, the value of one bar, a count of 0-6 small marks among clutter, the dominant colour, and
  easy-VQA (real 64x64 images and questions, coarse). The hard tasks still hinge on one cell, one bar top or a
  few 4-px marks (a few percent of the image), so pruning or pooling visual tokens can still lose them.
- `demo-variants`: the demo's four synthetic tasks with knobs set where no training stage ever puts them
  (more specks around the digits, a thinner bar, twice the clutter among the marks, more distractor shapes),
  at the demo's size: held-out task variants for checking that the policy generalises beyond what it saw.
- `demo-train`: the demo's tasks plus `easy_vqa_balanced` (easy-VQA's training images and question forms with
  yes and no equally likely), `easy_vqa_yes_no` (only its yes/no questions, to weight them apart) and
  `easy_vqa_color_yes_no` (only those naming a colour), for training the demo checkpoint; evaluation stays on
  `demo`.
- `two-hop`, `two-hop-train`, `two-hop-variants`: the demo's three suites plus `key_digit` (the digit drawn in the
  colour of a circle, among three coloured digits; four and more specks in the variants). Every demo task is
  answered by one read of the image; this one needs two (the key's colour, then the digit in that colour), so a
  VISOR configuration with fewer layers that read the image can fail on it where a larger one does not: the
  suite where a per-sample policy has something to choose.
- `curriculum`: the step between learning the demo's coarse tasks and its 3x3 `read_cell`: the coloured digit
  among four, one large shape per image (with per-patch shape targets, which easy-VQA lacks), and easy-VQA's
  balanced questions without the negated forms. Without it `read_cell` stays at chance (see the demo
  checkpoint's TRAINING.md, which also says what the easy-VQA step does and does not teach).
- `yes-no`, `yes-no-negated`: only easy-VQA's balanced yes/no questions, first without and then with the negated
  forms. The comparison they ask for ("is there a red shape?") is learned only when it is most of a batch.
- `video`, `video-variants`: the video tasks (`visor.data.video_tasks`), clips of 8 frames of 64x64 px (one
  tiny-preset crop each): the frame a small shape is in, how many frames show it, which shape changed colour, and
  the main colour (the easy one). The variants set their knobs where `video` never does (more shapes per frame,
  faster motion, more distractor shapes). Their samples are `VideoSample`s, which the image data sources refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from visor.data.easy_vqa import EasyVQA, EasyVQABalanced, EasyVQAColorYesNo, EasyVQAYesNo
from visor.data.tasks import DEFAULT_SIZE, TASKS, Task, get_task
from visor.data.video_tasks import VIDEO_SIZE, VIDEO_TASKS, VideoTask, get_video_task


@dataclass(frozen=True)
class Suite:
    name: str
    size: tuple[int, int]  # (height, width) of every image, or every frame of a video suite
    tasks: tuple[Task, ...]
    description: str

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def video(self) -> bool:
        """Whether the suite holds video tasks (its samples are `VideoSample`s, not images)."""
        return any(isinstance(task, VideoTask) for task in self.tasks)

    def select(self, names) -> tuple[Task, ...]:
        """The suite's tasks named in `names` (in the given order); a ValueError for names it lacks."""
        by_name = {task.name: task for task in self.tasks}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ValueError(f"suite {self.name!r} has no tasks {unknown}; it has {', '.join(by_name)}")
        return tuple(by_name[name] for name in names)


DEMO_TASKS = (
    get_task("read_cell", rows=3, cols=3, glyph_scale=0.7, pointer="ink"),
    get_task("bar_value", num_bars=1),
    get_task("count_marks", num_colors=1, mark_size=0.06, clutter=4, max_count=6),
    get_task("dominant_color"),
    EasyVQA(),
)

DEMO_TRAIN_TASKS = (*DEMO_TASKS, EasyVQABalanced(), EasyVQAYesNo(), EasyVQAColorYesNo())
DEMO_VARIANT_TASKS = (
    get_task("read_cell", rows=3, cols=3, glyph_scale=0.7, pointer="ink", clutter=1.0),
    get_task("bar_value", num_bars=1, bar_width=0.25),
    get_task("count_marks", num_colors=1, mark_size=0.06, clutter=8, max_count=6),
    get_task("dominant_color", distractors=5),
)
KEY_DIGIT = get_task("key_digit", rows=3, cols=3, glyph_scale=0.7, inks=3)
VIDEO_VARIANT_TASKS = (
    get_video_task("which_frame", shapes=6),
    get_video_task("count_frames", shapes=6),
    get_video_task("what_changed", motion=1.0),
    get_video_task("dominant_color_video", distractors=5),
)

SUITES: dict[str, Suite] = {
    "standard": Suite("standard", DEFAULT_SIZE, tuple(TASKS.values()),
                      "every task at its default knobs, 128x128 px"),
    "demo": Suite("demo", (64, 64), DEMO_TASKS,
                  "four synthetic tasks at 64x64 px, small enough for the CPU demo, plus easy-VQA"),
    "demo-train": Suite("demo-train", (64, 64), DEMO_TRAIN_TASKS,
                        "the demo suite plus easy-VQA with balanced yes/no answers, for training"),
    "demo-variants": Suite("demo-variants", (64, 64), DEMO_VARIANT_TASKS,
                           "the demo's synthetic tasks at knobs no training stage uses: held-out variants for the policy"),
    "two-hop": Suite("two-hop", (64, 64), (*DEMO_TASKS, KEY_DIGIT),
                     "the demo suite plus key_digit, a question that needs two reads of the image"),
    "two-hop-train": Suite("two-hop-train", (64, 64), (*DEMO_TRAIN_TASKS, KEY_DIGIT),
                           "demo-train plus key_digit, for training"),
    "two-hop-variants": Suite(
        "two-hop-variants", (64, 64),
        (*DEMO_VARIANT_TASKS, get_task("key_digit", rows=3, cols=3, glyph_scale=0.7, inks=4, clutter=1.0)),
        "demo-variants plus key_digit with four coloured digits and more specks: held-out variants"),
    "curriculum": Suite(
        "curriculum", (64, 64),
        (get_task("read_cell", rows=2, cols=2, glyph_scale=0.7, pointer="ink"), get_task("has_shape", distractors=0),
         EasyVQABalanced(negations=False)),
        "the coloured digit among four and one large shape, at 64x64 px: the step before the demo suite",
    ),
    "yes-no": Suite("yes-no", (64, 64), (EasyVQABalanced(negations=False, yes_no_only=True),),
                    "easy-VQA's positive yes/no forms only, balanced: where the comparison is learned"),
    "yes-no-negated": Suite("yes-no-negated", (64, 64), (EasyVQABalanced(yes_no_only=True),),
                            "easy-VQA's yes/no forms, positive and negated, balanced"),
    "video": Suite("video", VIDEO_SIZE, tuple(VIDEO_TASKS.values()),
                   "the video tasks at their default knobs: 8 frames of 64x64 px"),
    "video-curriculum": Suite(
        "video-curriculum", VIDEO_SIZE,
        (get_video_task("which_frame", shapes=3, object_size=0.3), get_video_task("count_frames", shapes=3, object_size=0.3),
         get_video_task("what_changed"), get_video_task("dominant_color_video")),
        "the video tasks with the named shape twice as large (19 px) among fewer shapes: the step before `video`"),
    "video-variants": Suite("video-variants", VIDEO_SIZE, VIDEO_VARIANT_TASKS,
                            "the video tasks at knobs `video` never uses: held-out variants"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]

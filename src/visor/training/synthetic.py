"""`--data synthetic`: the built-in task suite (`visor.data`) as a training `DataSource`.

Training sample i comes from slot `i % S` of a schedule that lists each task as many times as its weight
(`read_cell*3` in a data spec: three times as many read_cell samples), and is a pure function of seed and i; a
task's slots walk through its samples 0, 1, 2, ... without repeats, and every batch mixes the tasks in those
proportions. Prompts go through the suite's offline tokenizer and `VisorProcessor`
(right-padded with labels and per-patch targets for training; left-padded prompts for generation). A video suite
(`synthetic@video`) gives each prompt its clip instead of an image, every frame kept (the answers count frames),
for a family whose processor prepares video; its samples carry no per-patch targets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch

from visor.training.batches import EvalBatch


class SyntheticSource:
    def __init__(self, model_config, seed: int = 0, tasks: Sequence[str] | None = None, suite: str = "standard"):
        from visor.data.processor import VisorProcessor
        from visor.data.render import PATCH_CLASSES
        from visor.data.suites import get_suite
        from visor.data.tasks import make_sample
        from visor.data.tokenizer import build_tokenizer

        self.suite = get_suite(suite)
        names, weights = _weighted(tasks) if tasks else (list(self.suite.task_names), [1] * len(self.suite.tasks))
        self._task_objects = {task.name: task for task in self.suite.select(names)}
        frames = sorted({task.frames for task in self._task_objects.values()}) if self.suite.video else []
        if len(frames) > 1:
            raise ValueError(f"the video tasks {list(self._task_objects)} draw clips of {frames} frames; a batch's "
                             "clips must have one length")
        self.frames = frames[0] if frames else None
        self.tasks = tuple(self._task_objects)
        # (task, k, weight) slots: the k-th of a task's `weight` slots per cycle takes its samples k, k+weight, ...
        self.schedule = tuple((name, k, weight) for name, weight in zip(names, weights) for k in range(weight))
        self.seed = seed
        self.size = self.suite.size
        self._make_sample = make_sample
        self.tokenizer = build_tokenizer()
        vocab = model_config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the suite's tokenizer has {len(self.tokenizer)} ids but the model's vocabulary {vocab}")
        self._train = VisorProcessor(model_config, self.tokenizer, padding_side="right")
        self._prompt = VisorProcessor(model_config, self.tokenizer, padding_side="left")
        self.processor = self._prompt  # saved with the trained model, so its folder answers questions on its own
        if self.frames and self._train.videos is None:
            raise ValueError(f"suite {suite!r} holds video tasks, but {self._train.no_video}")
        # Per-patch targets (the auxiliary loss) follow LLaVA-OV's crops; the Qwen-VL families train without.
        self.num_patch_classes = (len(PATCH_CLASSES) if self._train.images.has_patch_targets and not self.frames
                                  else 0)

    def _sample(self, split: str, task: str, index: int):
        return self._make_sample(self._task_objects[task], split, index, self.seed, self.size)

    def _visual(self, samples) -> dict:
        """The processor's visual arguments for `samples`: their images, or their clips with every frame."""
        if self.frames:
            return dict(images=None, videos=[list(sample.frames) for sample in samples], num_frames=self.frames)
        return dict(images=[sample.image for sample in samples])

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        samples = []
        for i in indices:
            name, k, weight = self.schedule[i % len(self.schedule)]
            samples.append(self._sample("train", name, (i // len(self.schedule)) * weight + k))
        batch = self._train(
            questions=[s.question for s in samples], answers=[s.answer for s in samples],
            class_maps=[s.class_map for s in samples] if self.num_patch_classes else None, **self._visual(samples),
        )
        return dict(batch)

    def _eval_samples(self, split: str, per_task: int):
        return [self._sample(split, task, index) for task in self.tasks for index in range(per_task)]

    def eval_batches(self, split: str, per_task: int, batch_size: int) -> Iterator[EvalBatch]:
        samples = self._eval_samples(split, per_task)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            inputs = self._prompt(questions=[s.question for s in chunk], **self._visual(chunk))
            yield EvalBatch([s.task for s in chunk], dict(inputs), [s.answer for s in chunk])

    def label_batches(self, split: str, per_task: int, batch_size: int) -> Iterator[tuple[list, list, dict]]:
        """(tasks, groups, right-padded inputs with labels) of `split`: what `visor.policy.labels` scores."""
        samples = self._eval_samples(split, per_task)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            inputs = self._train(questions=[s.question for s in chunk], answers=[s.answer for s in chunk],
                                 **self._visual(chunk))
            yield [s.task for s in chunk], [s.group for s in chunk], dict(inputs)

    def decode(self, token_ids) -> str:
        return self._prompt.decode(token_ids)

    def majority_baseline(self, split: str, per_task: int) -> dict[str, float]:
        """Accuracy (%) of always answering each task's most frequent answer, on the same samples `evaluate` uses."""
        by_task: dict[str, Counter] = {task: Counter() for task in self.tasks}
        for sample in self._eval_samples(split, per_task):
            by_task[sample.task][sample.answer] += 1
        return {task: 100.0 * counts.most_common(1)[0][1] / sum(counts.values()) for task, counts in by_task.items()}


def _weighted(specs: Sequence[str]) -> tuple[list[str], list[int]]:
    """Task names and integer weights from `NAME` or `NAME*WEIGHT` items; a ValueError for bad weights."""
    names, weights = [], []
    for spec in specs:
        name, _, weight = spec.partition("*")
        if not weight:
            weight = "1"
        if not weight.isdigit() or int(weight) < 1:
            raise ValueError(f"task weight in {spec!r} must be a positive integer")
        if name in names:
            raise ValueError(f"task {name!r} is listed twice")
        names.append(name)
        weights.append(int(weight))
    return names, weights

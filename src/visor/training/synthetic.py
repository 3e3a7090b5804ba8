"""`--data synthetic`: the built-in task suite (`visor.data`) as a training `DataSource`.

Training sample i is task `tasks[i % T]`'s sample `i // T` of the train split (a pure function of seed and i), so
every batch mixes the tasks evenly. Prompts go through the suite's offline tokenizer and `VisorProcessor`
(right-padded with labels and per-patch targets for training; left-padded prompts for generation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch

from visor.training.data import EvalBatch


class SyntheticSource:
    def __init__(self, model_config, seed: int = 0, tasks: Sequence[str] | None = None, size=None):
        from visor.data.processor import VisorProcessor
        from visor.data.render import PATCH_CLASSES
        from visor.data.tasks import DEFAULT_SIZE, TASKS, make_sample
        from visor.data.tokenizer import build_tokenizer

        names = list(tasks) if tasks else list(TASKS)
        unknown = [name for name in names if name not in TASKS]
        if unknown:
            raise ValueError(f"data spec names unknown synthetic tasks {unknown}; the suite has {', '.join(TASKS)}")
        self.tasks = tuple(names)
        self.seed = seed
        self.size = tuple(size or DEFAULT_SIZE)
        self._make_sample = make_sample
        self.tokenizer = build_tokenizer()
        vocab = model_config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the suite's tokenizer has {len(self.tokenizer)} ids but the model's vocabulary {vocab}")
        self._train = VisorProcessor(model_config, self.tokenizer, padding_side="right")
        self._prompt = VisorProcessor(model_config, self.tokenizer, padding_side="left")
        self.num_patch_classes = len(PATCH_CLASSES)

    def _sample(self, split: str, task: str, index: int):
        return self._make_sample(task, split, index, self.seed, self.size)

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        count = len(self.tasks)
        samples = [self._sample("train", self.tasks[i % count], i // count) for i in indices]
        batch = self._train(
            [s.image for s in samples], [s.question for s in samples], [s.answer for s in samples],
            class_maps=[s.class_map for s in samples],
        )
        return dict(batch)

    def _eval_samples(self, split: str, per_task: int):
        return [self._sample(split, task, index) for task in self.tasks for index in range(per_task)]

    def eval_batches(self, split: str, per_task: int, batch_size: int) -> Iterator[EvalBatch]:
        samples = self._eval_samples(split, per_task)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            inputs = self._prompt([s.image for s in chunk], [s.question for s in chunk])
            yield EvalBatch([s.task for s in chunk], dict(inputs), [s.answer for s in chunk])

    def decode(self, token_ids) -> str:
        return self._prompt.decode(token_ids)

    def majority_baseline(self, split: str, per_task: int) -> dict[str, float]:
        """Accuracy (%) of always answering each task's most frequent answer, on the same samples `evaluate` uses."""
        by_task: dict[str, Counter] = {task: Counter() for task in self.tasks}
        for sample in self._eval_samples(split, per_task):
            by_task[sample.task][sample.answer] += 1
        return {task: 100.0 * counts.most_common(1)[0][1] / sum(counts.values()) for task, counts in by_task.items()}

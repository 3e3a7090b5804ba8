"""`--data llava:FILE.json` and `--data hf:DIR`: conversation data on disk (`visor.data.conversations`) as a
training `DataSource`.

Samples are processed by the model's own processor (the tokenizer, chat template and image settings saved next to
the `--init` checkpoint: `VisorProcessor.from_pretrained`), through `VisorProcessor.conversations`: every
assistant turn is labelled, nothing else. Training sample i is record `perm_e[i % N]` of the training split,
`perm_e` a permutation drawn from (seed, epoch e = i // N): a pure function of seed and i, so batches are
deterministic and resumable like the synthetic suite's. Evaluation asks
for each held-out record's last assistant turn and judges the greedy answer by exact match.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from visor.data.conversations import Conversation, open_image, prompt_and_answer, read_conversations
from visor.training.batches import EvalBatch


class ConversationSource:
    num_patch_classes = 0

    def __init__(self, model_config, kind: str, path: str | Path, tokenizer_dir: str | Path | None, seed: int = 0,
                 image_root: str | Path | None = None, max_length: int | None = None, skip_broken: bool = False,
                 images_outside_root: bool = False):
        from visor.data.processor import VisorProcessor

        if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            raise ValueError(f"--data {kind}: conversation data is tokenised by the model's own tokenizer and chat "
                             f"template, and {tokenizer_dir or 'a model preset'} has none: start from a checkpoint "
                             "folder that holds one (--init; `visor convert` copies it from the stock model)")
        self._train = VisorProcessor.from_pretrained(tokenizer_dir, model_config, padding_side="right")
        self._prompt = VisorProcessor.from_pretrained(tokenizer_dir, model_config, padding_side="left")
        self.processor = self._prompt  # the checkpoint's, saved with the trained model
        self.data = read_conversations(kind, path, image_root, skip_broken, images_outside_root,
                                       min_image_side=self._train.images.min_side)
        self.seed = seed
        self.max_length = max_length
        tasks = dict.fromkeys(r.task for split in self.data.splits.values() for r in split)
        self.tasks = tuple(tasks)
        self._epoch: tuple[int, list[int]] | None = None

    @property
    def skipped(self) -> list[str]:
        return self.data.skipped

    def _order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(len(self.data.splits["train"]), generator=generator).tolist())
        return self._epoch[1]

    def _batch(self, processor, records: Sequence[Conversation], messages: Sequence, prompt_only: bool) -> dict:
        try:
            return dict(processor.conversations([[open_image(image) for image in r.images] for r in records],
                                                messages, prompt_only=prompt_only, max_length=self.max_length))
        except ValueError as error:
            raise ValueError(f"a batch of {', '.join(r.where for r in records)}: {error}") from error

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        train = self.data.splits["train"]
        records = [train[self._order(i // len(train))[i % len(train)]] for i in indices]
        return self._batch(self._train, records, [r.messages for r in records], prompt_only=False)

    def _eval_records(self, split: str, per_task: int) -> list[Conversation]:
        if split not in self.data.splits:
            raise ValueError(f"no split {split!r}: the data has {sorted(self.data.splits)}")
        by_task: dict[str, list[Conversation]] = {task: [] for task in self.tasks}
        for record in self.data.splits[split]:
            if len(by_task[record.task]) < per_task:
                by_task[record.task].append(record)
        return [record for records in by_task.values() for record in records]

    def eval_batches(self, split: str, per_task: int, batch_size: int) -> Iterator[EvalBatch]:
        records = self._eval_records(split, per_task)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            asked = [prompt_and_answer(r) for r in chunk]
            inputs = self._batch(self._prompt, chunk, [messages for messages, _ in asked], prompt_only=True)
            yield EvalBatch([r.task for r in chunk], inputs, [answer for _, answer in asked])

    def decode(self, token_ids) -> str:
        return self._prompt.decode(token_ids)

"""What training needs from a data set, and deterministic batches.

The engine never holds a data loader. A `DataSource` turns *global sample indices* into a collated batch, and
the indices of a batch are a pure function of (step, micro-step, process index): `step_indices`. With sample
`i` itself a pure function of (seed, split, i), the batch at step k does not depend on anything that happened
before, so a resumed run sees exactly the samples an uninterrupted one would, and N processes with a micro-batch
of B/N see together exactly the samples one process sees with a batch of B.

Data specs (`--data`):

- `synthetic` — the built-in task suite (`visor.data`) at full difficulty; `synthetic@SUITE` a named suite
  (`visor.data.suites`, e.g. `synthetic@demo`); `synthetic:TASK,TASK` or `synthetic@SUITE:TASK,...` keeps some tasks;
- `llava:FILE.json` — LLaVA-format conversations (images under the `image_root` setting, by default the file's
  folder); `hf:DIR` — a `datasets` folder of chat `messages` and images (`visor.data.conversations`, tokenised by
  the model's own tokenizer and chat template: `visor.training.conversations`);
- `module.path:factory` — any importable callable `factory(model_config, seed) -> DataSource`, for user data.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from visor.training.batches import EvalBatch


@runtime_checkable
class DataSource(Protocol):
    tasks: Sequence[str]
    """Task names, in a fixed order."""
    num_patch_classes: int
    """Classes of the per-patch auxiliary targets (0 when the data has none)."""

    def train_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Training samples `indices` collated: input_ids, attention_mask, pixel_values, image_sizes, labels
        (-100 outside the answer) and, when `num_patch_classes`, `patch_targets` (batch, crops, patches) aligned
        with `pixel_values`' crops (-100 where there is no target)."""

    def eval_batches(self, split: str, per_task: int, batch_size: int) -> Iterator[EvalBatch]:
        """`per_task` samples of every task from `split` ("validation" or "test"), in batches."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated answer tokens (special tokens and anything after the end of the answer dropped)."""


def step_indices(step: int, micro_step: int, process_index: int, num_processes: int,
                 micro_batch: int, accumulation: int) -> list[int]:
    """Global sample indices of one micro-batch: step k covers samples [k*G, (k+1)*G), G the global batch.

    Inside a step, micro-step m of process p takes the slice starting at (m * num_processes + p) * micro_batch,
    so every configuration of processes and accumulation with the same global batch covers the same samples
    in each optimizer step.
    """
    global_batch = micro_batch * accumulation * num_processes
    start = step * global_batch + (micro_step * num_processes + process_index) * micro_batch
    return list(range(start, start + micro_batch))


SPECS = "'synthetic', 'synthetic@SUITE', 'synthetic:TASK,...', 'llava:FILE.json', 'hf:DIR' or 'module.path:factory'"


def resolve_data(spec: str, model_config, seed: int, settings=None, model_dir=None) -> DataSource:
    """The `DataSource` a `--data` spec names; a ValueError when it names nothing usable. Conversation data reads
    the tokenizer saved in `model_dir` and the data settings (`image_root`, `images_outside_root`,
    `max_sequence_length`, `skip_broken_records`) of `settings`."""
    if not spec or not isinstance(spec, str):
        raise ValueError(f"--data is empty: use {SPECS}")
    name, _, argument = spec.partition(":")
    source, _, suite = name.partition("@")
    if source == "synthetic":
        tasks = [task for task in argument.split(",") if task] if argument else None
        return _synthetic(model_config, seed, tasks, suite or "standard")
    if name in ("llava", "hf"):
        from visor.training.conversations import ConversationSource

        if not argument:
            raise ValueError(f"data spec {spec!r} names no {'file' if name == 'llava' else 'folder'}")
        options = {} if settings is None else dict(
            image_root=settings.image_root, images_outside_root=settings.images_outside_root,
            max_length=settings.max_sequence_length, skip_broken=settings.skip_broken_records)
        return ConversationSource(model_config, name, argument, model_dir, seed, **options)
    if name and argument:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"data spec {spec!r}: cannot import {name!r} ({error})") from error
        factory = getattr(module, argument, None)
        if not callable(factory):
            raise ValueError(f"data spec {spec!r}: {name} has no callable {argument!r}")
        source = factory(model_config=model_config, seed=seed)
        missing = [attr for attr in ("tasks", "num_patch_classes", "train_batch", "eval_batches", "decode")
                   if not hasattr(source, attr)]
        if missing:
            raise ValueError(f"data spec {spec!r}: the object it builds lacks {missing}")
        if not source.tasks:
            raise ValueError(f"data spec {spec!r} gives no tasks")
        return source
    raise ValueError(f"data spec {spec!r} matches nothing: use {SPECS}")


def _synthetic(model_config, seed: int, tasks: list[str] | None, suite: str) -> DataSource:
    from visor.training.synthetic import SyntheticSource

    return SyntheticSource(model_config, seed, tasks, suite)

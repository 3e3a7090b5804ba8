"""Scoring one system (a model plus how it is run) on held-out prompts: per-sample correctness and FLOPs.

Every row of the demo — the full model, each fixed VISOR configuration, the VISOR policy, each token-reduction
baseline — goes through `score_system`, so all are judged on the same samples, by the same exact-match rule on
greedy answers from `generate()`, with FLOPs from the one counter (`visor.flops`) for the tokens each sample
really had.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from visor.evaluation.metrics import exact_match
from visor.training.data import DataSource

# generate(inputs) -> (new token ids (B, T), LLM prefill FLOPs per sample (B,), configuration per sample (B,) or None)
Generate = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass
class Scores:
    """Per-sample outcome of one system on one split, in the data source's sample order."""

    tasks: list[str]
    correct: list[bool]
    flops: list[int]
    configurations: list[int | None]

    def to_dict(self) -> dict:
        return dict(tasks=self.tasks, correct=self.correct, flops=self.flops, configurations=self.configurations)

    @classmethod
    def from_dict(cls, value: dict) -> Scores:
        return cls(value["tasks"], value["correct"], value["flops"], value["configurations"])


@torch.no_grad()
def score_system(generate: Generate, data: DataSource, split: str, per_task: int, batch_size: int = 32,
                 description: str | None = None, progress: bool = True) -> Scores:
    """Run `generate` over `per_task` prompts of every task of `split` and score each answer."""
    batches = list(data.eval_batches(split, per_task, batch_size))
    tasks, correct, flops, configurations = [], [], [], []
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        new_tokens, sample_flops, chosen = generate(batch.inputs)
        for row, (task, answer) in enumerate(zip(batch.tasks, batch.answers)):
            tasks.append(task)
            correct.append(bool(exact_match(data.decode(new_tokens[row].tolist()), answer)))
            flops.append(int(sample_flops[row]))
            configurations.append(None if chosen is None else int(chosen[row]))
    return Scores(tasks, correct, flops, configurations)


def greedy(model, max_new_tokens: int, **options) -> Callable[[dict], torch.Tensor]:
    """Greedy new tokens of `model.generate` for a prompt batch (pad/eos from the model's text config)."""
    text_config = model.config.text_config

    def run(inputs: dict):
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id,
                                return_dict_in_generate=True, **options)
        return output.sequences[:, inputs["input_ids"].shape[1]:], output

    return run

"""Greedy answers and exact-match accuracy of a stock model under a layer schedule (`LayerProbe` kinds), or of
any model through a generate function.

The sweeps score the same prompts dozens of times, so the prompts are built once (`prompt_batches`) and every
schedule is judged on exactly the same samples by the project's exact-match rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from visor.analysis.probe import LayerProbe
from visor.evaluation.metrics import exact_match
from visor.training.data import DataSource, EvalBatch


def prompt_batches(data: DataSource, split: str, per_task: int, batch_size: int) -> list[EvalBatch]:
    return list(data.eval_batches(split, per_task, batch_size))


@torch.no_grad()
def answer(model, batch: EvalBatch, max_new_tokens: int, blind: Iterable[int] = (),
           read: Iterable[int] = ()) -> torch.Tensor:
    """(B, T) greedy new tokens for a prompt batch, with some layers blind or read (see `LayerProbe`)."""
    text_config = model.config.text_config
    with LayerProbe(model, batch.inputs["input_ids"], blind=blind, read=read):
        generated = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id)
    return generated[:, batch.inputs["input_ids"].shape[1]:]


def outcomes(data: DataSource, batches: list[EvalBatch],
             generate: Callable[[EvalBatch], torch.Tensor]) -> list[tuple[str, bool]]:
    """(task, correct) of every prompt, in batch order; `generate(batch)` gives the (B, T) new tokens."""
    results = []
    for batch in batches:
        new_tokens = generate(batch)
        for task, tokens, reference in zip(batch.tasks, new_tokens.tolist(), batch.answers):
            results.append((task, bool(exact_match(data.decode(tokens), reference))))
    return results


def correctness(model, data: DataSource, batches: list[EvalBatch], max_new_tokens: int, blind: Iterable[int] = (),
                read: Iterable[int] = ()) -> list[tuple[str, bool]]:
    """(task, correct) of every prompt, in batch order, under the schedule."""
    blind, read = list(blind), list(read)
    return outcomes(data, batches, lambda batch: answer(model, batch, max_new_tokens, blind, read))


def task_accuracy(outcomes: list[tuple[str, bool]]) -> dict[str, float]:
    """Accuracy (%) per task and their mean ("mean", every task weighs the same)."""
    by_task: dict[str, list[bool]] = {}
    for task, correct in outcomes:
        by_task.setdefault(task, []).append(correct)
    scores = {task: 100.0 * sum(values) / len(values) for task, values in by_task.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def accuracy(model, data: DataSource, batches: list[EvalBatch], max_new_tokens: int, blind: Iterable[int] = (),
             read: Iterable[int] = ()) -> dict[str, float]:
    """Accuracy (%) per task and their mean ("mean") under the schedule."""
    return task_accuracy(correctness(model, data, batches, max_new_tokens, blind, read))

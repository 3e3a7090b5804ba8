"""Validation during and after training: greedy answers, exact match per task.

Answers are generated with `generate()` (greedy, no sampling), decoded by the data source and scored with the
metrics module's exact match (`visor.evaluation.metrics`).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import torch

from visor.evaluation.metrics import exact_match
from visor.training.data import DataSource


@torch.no_grad()
def evaluate(
    model,
    data: DataSource,
    split: str = "validation",
    per_task: int = 100,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    configuration: int | None = None,
    autocast=None,
) -> dict[str, float]:
    """Accuracy (%) per task and their mean ("mean") of greedy answers; `configuration` for VISOR models."""
    was_training = model.training
    model.eval()
    correct: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    options = {} if configuration is None else {"configuration": configuration}
    pad = getattr(model.config.text_config, "pad_token_id", None)
    eos = getattr(model.config.text_config, "eos_token_id", None)
    try:
        for batch in data.eval_batches(split, per_task, batch_size):
            inputs = {key: value.to(model.device) for key, value in batch.inputs.items()}
            with autocast() if autocast is not None else nullcontext():
                generated = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    eos_token_id=eos, **options,
                )
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            for task, tokens, answer in zip(batch.tasks, new_tokens.tolist(), batch.answers):
                correct[task] += exact_match(data.decode(tokens), answer)
                total[task] += 1
    finally:
        model.train(was_training)
    accuracy = {task: 100.0 * correct[task] / total[task] for task in data.tasks if total[task]}
    if accuracy:
        accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


def evaluate_configurations(model, data: DataSource, configurations, **options) -> dict[str, dict[str, float]]:
    """`evaluate` at each configuration index (keys are the indices as strings, JSON-friendly)."""
    return {str(index): evaluate(model, data, configuration=index, **options) for index in configurations}

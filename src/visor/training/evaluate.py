"""Validation during and after training: greedy answers, exact match per task (`visor.evaluation.scoring`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from visor.evaluation.scoring import greedy, new_tokens, score
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
    options = {} if configuration is None else {"configuration": configuration}

    def generate(inputs):
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        with autocast() if autocast is not None else nullcontext():
            return new_tokens(greedy(model, inputs, max_new_tokens, **options), inputs), None, None

    was_training = model.training
    model.eval()
    try:
        return score(data, data.eval_batches(split, per_task, batch_size), generate).accuracy(data.tasks)
    finally:
        model.train(was_training)


def evaluate_configurations(model, data: DataSource, configurations, **options) -> dict[str, dict[str, float]]:
    """`evaluate` at each configuration index (keys are the indices as strings, JSON-friendly)."""
    return {str(index): evaluate(model, data, configuration=index, **options) for index in configurations}

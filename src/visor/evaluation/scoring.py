"""How the project scores a model: greedy answers judged by exact match, and answers scored under teacher forcing.

`greedy` is the project's `generate()` call (no sampling, pad and end tokens from the model's text config);
`score` runs a generate function over prompt batches and keeps, per sample, whether the answer was right, what
the prompt cost in LLM prefill FLOPs and which configuration ran, so training validation, the demo's rows and
the analysis sweeps judge answers by the same rule; `evaluate` is the per-task accuracy of one model on a data
source's split (validation during training, the configuration search). `teacher_forced` scores given answers from the logits that
predict them (the policy's labels, lmms-eval's log-likelihood requests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from visor.evaluation.metrics import exact_match

# generate(inputs) -> (new token ids (B, T), LLM prefill FLOPs (B,) or None, configuration per sample (B,) or None)
Generate = Callable[[dict], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def greedy(model, inputs: dict, max_new_tokens: int, **options):
    """`model.generate` without sampling (a dict-like output with `sequences` and the cache)."""
    text_config = model.config.text_config
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                          pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id, **options)


def new_tokens(output, inputs: dict) -> torch.Tensor:
    """The generated part of `greedy`'s sequences (B, T)."""
    return output.sequences[:, inputs["input_ids"].shape[1]:]


def teacher_forced(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of target tokens (B, T; -100 where nothing is scored) under logits (B, T, V) that predict them:
    the summed log-probability, the number of scored tokens, and whether greedy decoding gives exactly them."""
    predicted = logits.float()
    scored = targets != -100
    log_probs = torch.log_softmax(predicted, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    greedy_match = ((predicted.argmax(dim=-1) == targets) | ~scored).all(dim=1)
    return (log_probs * scored).sum(dim=1), scored.sum(dim=1), greedy_match


@dataclass
class Scores:
    """Per-sample outcome of one system on prompt batches, in batch order."""

    tasks: list[str]
    correct: list[bool]
    flops: list[int | None]
    configurations: list[int | None]

    def accuracy(self, order: Iterable[str] = ()) -> dict[str, float]:
        """Accuracy (%) per task (tasks in `order` first, then in order of appearance) and their mean ("mean":
        every task weighs the same)."""
        by_task: dict[str, list[bool]] = {task: [] for task in order}
        for task, correct in zip(self.tasks, self.correct):
            by_task.setdefault(task, []).append(correct)
        scores = {task: 100.0 * sum(values) / len(values) for task, values in by_task.items() if values}
        if scores:
            scores["mean"] = sum(scores.values()) / len(scores)
        return scores


@torch.no_grad()
def score(data, batches: Iterable, generate: Generate, description: str | None = None,
          progress: bool = False) -> Scores:
    """Run `generate` on every batch (`tasks`, `answers`, `inputs`) and judge each answer with `data.decode`."""
    batches = list(batches)
    tasks, correct, flops, configurations = [], [], [], []
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        tokens, sample_flops, chosen = generate(batch.inputs)
        for row, (task, answer) in enumerate(zip(batch.tasks, batch.answers)):
            tasks.append(task)
            correct.append(bool(exact_match(data.decode(tokens[row].tolist()), answer)))
            flops.append(None if sample_flops is None else int(sample_flops[row]))
            configurations.append(None if chosen is None else int(chosen[row]))
    return Scores(tasks, correct, flops, configurations)


@torch.no_grad()
def evaluate(model, data, split: str = "validation", per_task: int = 100, batch_size: int = 32,
             max_new_tokens: int = 8, configuration: int | None = None, autocast=None) -> dict[str, float]:
    """Accuracy (%) per task of `data` and their mean ("mean") of greedy answers; `configuration` for VISOR models,
    `autocast` a context factory (e.g. bf16) or None."""
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

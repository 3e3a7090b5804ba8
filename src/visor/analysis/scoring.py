"""Exact-match scores of a stock model under a layer schedule (`probe` kinds).

The sweeps score the same prompts dozens of times, so the prompts are built once and every
schedule is judged on exactly the same samples by the project's one scorer (`visor.evaluation.scoring`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from visor.analysis.probe import probe
from visor.evaluation.scoring import Scores, greedy, new_tokens, score
from visor.training.batches import EvalBatch
from visor.training.data import DataSource


@torch.no_grad()
def answer(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    """(B, T) greedy new tokens for a prompt batch."""
    return new_tokens(greedy(model, inputs, max_new_tokens), inputs)


def correctness(model, data: DataSource, batches: list[EvalBatch], max_new_tokens: int, blind: Iterable[int] = (),
                read: Iterable[int] = ()) -> Scores:
    """Per-prompt scores, in batch order, with some layers blind or read (see `probe`)."""
    probed = probe(model, blind=blind, read=read)
    return score(data, batches, lambda inputs: (answer(probed, inputs, max_new_tokens), None, None))

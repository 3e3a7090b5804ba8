"""The evaluation batch every data source yields (`visor.training.data.DataSource.eval_batches`), in a module of its
own so that the sources (`synthetic`, `conversations`) and the spec resolver that picks one (`data`) need not import
each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalBatch:
    """Prompts without answers (left-padded, ready for `generate`), their tasks and reference answers."""

    tasks: list[str]
    inputs: dict[str, torch.Tensor]
    answers: list[str]

"""Glue the CLI and the demo share: loading a model for the policy, labelling the synthetic suite, checks."""

from __future__ import annotations

import torch

from visor.backbones import family
from visor.config import Schedule
from visor.flops import llm_prefill_flops
from visor.policy.labels import LabelTable, label_configurations, model_fingerprint
from visor.training.recipes import is_visor, load_checkpoint


def load_model(path):
    """A VISOR model of any family from a local folder, with a router to train."""
    model = load_checkpoint(path).eval()
    if not is_visor(model):
        raise ValueError(f"{path} is a stock model, not a VISOR model: convert and train it first (visor train)")
    if model.router is None:
        raise ValueError(f"{path} has a single configuration: there is nothing for a policy to choose")
    return model


def load_labels_for(model, path) -> LabelTable:
    """A label table, refused if another model (other configurations, width or router layer) produced it."""
    table = LabelTable.load(path)
    expected = model_fingerprint(model.config)
    if table.fingerprint != expected:
        raise ValueError(f"label table {path} was made for a different model: {table.fingerprint} != {expected}")
    return table


def load_reference(path, model):
    """The stock model `model` was converted from (or one like it), to score the same samples with."""
    reference = load_checkpoint(path).eval()
    if is_visor(reference):
        raise ValueError(f"{path} is a VISOR model: the reference is a stock model (the one converted from)")
    ours, theirs = model.config, reference.config
    if family(theirs) is not family(ours) or theirs.image_token_id != ours.image_token_id \
            or theirs.text_config.vocab_size != ours.text_config.vocab_size:
        raise ValueError(f"{path} is not the stock model of this VISOR model: another family, image token or vocabulary")
    return reference


def label_synthetic(model, split: str, per_task: int, seed: int = 0, tasks=None, batch_size: int = 32,
                    show_progress: bool = True, suite: str = "standard", reference_model=None,
                    reference_name: str | None = None) -> LabelTable:
    """Every configuration of `model` labelled on `per_task` samples per task of a synthetic suite's `split`
    (and the `reference_model`'s correctness on each, when given)."""
    from visor.training.synthetic import SyntheticSource

    if per_task < 1 or batch_size < 1:
        raise ValueError(f"per_task and batch_size must be positive, got {per_task} and {batch_size}")
    source = SyntheticSource(model.config, seed, tasks, suite)
    return label_configurations(model, list(source.label_batches(split, per_task, batch_size)), show_progress,
                                reference_model, reference_name)


def full_model_flops(model, table: LabelTable) -> torch.Tensor:
    """(N,) the stock model's LLM prefill FLOPs for each sample: savings are measured against it."""
    return torch.tensor([llm_prefill_flops(model.config, visual, text, Schedule.full(model.config)).total
                         for visual, text in table.tokens.tolist()], dtype=torch.int64)

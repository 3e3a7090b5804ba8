"""Offline labels for the policy: run every configuration on a split and score each.

For every sample and configuration we store
- `probability`: the answer's probability under teacher forcing (exp of the summed answer-token log-probs,
  end token included), the soft score the 99% rule is applied to;
- `correct`: whether greedy decoding would produce exactly the answer (every teacher-forced argmax equals the
  label: the same thing, token for token, as comparing a greedy generation with the answer);
- `flops`: the configuration's LLM prefill FLOPs for this sample's token counts (`visor.flops`);
plus the router's input features, which do not depend on the configuration (every layer before the router
runs the same way in all of them), so one table trains, calibrates and evaluates the router offline.

A configuration is "good" for a sample when its score reaches 99% of the largest configuration's score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from visor.config import Schedule
from visor.evaluation.scoring import teacher_forced
from visor.files import atomic_path
from visor.flops import llm_prefill_flops, prompt_token_counts

LABEL_RULES = ("probability", "correct")


@dataclass
class LabelTable:
    """Per-sample, per-configuration scores of one model on one split."""

    features: torch.Tensor  # (N, 2d) router input
    probability: torch.Tensor  # (N, C) answer probability
    correct: torch.Tensor  # (N, C) bool
    flops: torch.Tensor  # (N, C) int64, LLM prefill FLOPs
    tokens: torch.Tensor  # (N, 2) int64, visual and text tokens of the prompt
    tasks: list[str]
    groups: list[str]
    fingerprint: dict = field(default_factory=dict)  # what model produced it (checked when reused)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_configurations(self) -> int:
        return self.probability.shape[1]

    def good(self, rule: str = "probability", ratio: float = 0.99, largest: int | None = None) -> torch.Tensor:
        """(N, C) bool: configurations whose score reaches `ratio` of the largest configuration's score."""
        if rule not in LABEL_RULES:
            raise ValueError(f"label rule must be one of {LABEL_RULES}, got {rule!r}")
        largest = self.num_configurations - 1 if largest is None else largest
        score = self.probability if rule == "probability" else self.correct.float()
        return score >= ratio * score[:, largest : largest + 1]

    def select(self, rows: torch.Tensor | Sequence[int]) -> "LabelTable":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return LabelTable(
            self.features[rows], self.probability[rows], self.correct[rows], self.flops[rows], self.tokens[rows],
            [self.tasks[i] for i in rows.tolist()], [self.groups[i] for i in rows.tolist()], dict(self.fingerprint),
        )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; the string columns and the fingerprint go in its metadata."""
        tensors = dict(features=self.features.float().contiguous(), probability=self.probability.contiguous(),
                       correct=self.correct.contiguous(), flops=self.flops.contiguous(),
                       tokens=self.tokens.contiguous())
        metadata = dict(tasks=json.dumps(self.tasks), groups=json.dumps(self.groups),
                        fingerprint=json.dumps(self.fingerprint))
        with atomic_path(path) as temporary:
            save_file(tensors, temporary, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelTable":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ValueError(f"label table {path} does not exist")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except SafetensorError as error:
            raise ValueError(f"{path} is not a VISOR label table (not a safetensors file: {error})") from error
        if not {"tasks", "groups", "fingerprint"} <= set(metadata):
            raise ValueError(f"{path} is not a VISOR label table (metadata missing)")
        tensors = load_file(path)
        return cls(tensors["features"], tensors["probability"], tensors["correct"], tensors["flops"], tensors["tokens"],
                   json.loads(metadata["tasks"]), json.loads(metadata["groups"]), json.loads(metadata["fingerprint"]))


def model_fingerprint(config) -> dict:
    """What a router depends on: hidden size, the configurations and where it sits."""
    return dict(hidden_size=config.text_config.hidden_size, configurations=config.configurations,
                router_layer=config.router_layer, num_layers=config.num_layers)


@torch.no_grad()
def router_features(model, inputs: dict) -> torch.Tensor:
    """The router's input features for a batch (captured from a routed forward; no layer runs twice).

    With `labels` present, the answer is masked out first: the router must decide from the prompt alone.
    """
    inputs = prompt_only(inputs)
    captured = []
    handle = model.router.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    try:
        with model.router.labelling():
            model(**inputs, configuration="auto", logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def score_configuration(model, inputs: dict, configuration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer probability, greedy-correct) per sample under teacher forcing; `inputs` carry `labels`."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, configuration=configuration).logits
    log_probability, _, correct = teacher_forced(logits[:, :-1], inputs["labels"][:, 1:])
    return torch.exp(log_probability), correct


def label_configurations(model, batches, show_progress: bool = True) -> LabelTable:
    """Run every configuration on `batches` of (tasks, groups, inputs-with-labels) and build the table."""
    config = model.config
    if model.router is None:
        raise ValueError("labelling needs a model with more than one configuration (and so a router)")
    features, probabilities, corrects, flops, tokens, tasks, groups = [], [], [], [], [], [], []
    configurations = range(len(config.configurations))
    for batch_tasks, batch_groups, inputs in tqdm(batches, desc="labelling", disable=not show_progress):
        features.append(router_features(model, inputs))
        scores = [score_configuration(model, inputs, index) for index in configurations]
        probabilities.append(torch.stack([probability for probability, _ in scores], dim=1))
        corrects.append(torch.stack([correct for _, correct in scores], dim=1))
        counts = prompt_tokens(config, inputs)
        tokens.append(counts)
        flops.append(torch.tensor([[llm_prefill_flops(config, visual, text, Schedule.of(config, index)).total
                                    for index in configurations]
                                   for visual, text in counts.tolist()], dtype=torch.int64))
        tasks += batch_tasks
        groups += batch_groups
    return LabelTable(torch.cat(features).float(), torch.cat(probabilities), torch.cat(corrects), torch.cat(flops),
                      torch.cat(tokens), tasks, groups, model_fingerprint(config))


def prompt_only(inputs: dict) -> dict:
    """Inputs without the answer: labelled positions leave the attention mask (they come after the prompt)."""
    if "labels" not in inputs:
        return inputs
    prompt = {key: value for key, value in inputs.items() if key != "labels"}
    prompt["attention_mask"] = inputs["attention_mask"] * (inputs["labels"] == -100)
    return prompt


def prompt_tokens(config, inputs: dict) -> torch.Tensor:
    """(B, 2) visual and text tokens of each prompt (the answer is not part of what the policy pays for)."""
    return torch.stack(prompt_token_counts(config, prompt_only(inputs)), dim=1).to(torch.int64)

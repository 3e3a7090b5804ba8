"""Offline labels for the policy: run every configuration on a split and score each.

For every sample and configuration we store
- `probability`: the answer's probability under teacher forcing (exp of the summed answer-token log-probs,
  end token included), the soft score the 99% rule is applied to;
- `correct`: whether greedy decoding would produce exactly the answer (every teacher-forced argmax equals the
  label: the same thing, token for token, as comparing a greedy generation with the answer);
- `flops`: the configuration's LLM prefill FLOPs for this sample's token counts (`visor.flops`);
plus the router's input features, which do not depend on the configuration (every layer before the router
runs the same way in all of them), so one table trains, calibrates and evaluates the router offline; and,
optionally, whether a reference model (the stock full model the VISOR model was converted from) answers each
sample, what a budget with a guarantee (`visor.policy.guarantee`) measures its loss against.

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
LARGEST_REFERENCE = "the largest configuration"  # what the policy's loss is measured against without a reference model


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
    reference: torch.Tensor | None = None  # (N,) bool: the reference model greedy-correct; None: no reference model
    reference_name: str = LARGEST_REFERENCE

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_configurations(self) -> int:
        return self.probability.shape[1]

    @property
    def reference_correct(self) -> torch.Tensor:
        """(N,) bool: the reference's correctness (the reference model's, else the largest configuration's)."""
        return self.correct[:, -1] if self.reference is None else self.reference

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
            None if self.reference is None else self.reference[rows], self.reference_name,
        )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; the string columns and the fingerprint go in its metadata."""
        tensors = dict(features=self.features.float().contiguous(), probability=self.probability.contiguous(),
                       correct=self.correct.contiguous(), flops=self.flops.contiguous(),
                       tokens=self.tokens.contiguous())
        if self.reference is not None:
            tensors["reference"] = self.reference.contiguous()
        metadata = dict(tasks=json.dumps(self.tasks), groups=json.dumps(self.groups),
                        fingerprint=json.dumps(self.fingerprint), reference_name=self.reference_name)
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
                   json.loads(metadata["tasks"]), json.loads(metadata["groups"]), json.loads(metadata["fingerprint"]),
                   tensors.get("reference"), metadata.get("reference_name", LARGEST_REFERENCE))


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
def score_answers(model, inputs: dict, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer probability, greedy-correct) per sample under teacher forcing; `inputs` carry `labels`; `options`
    go to the model's forward (a VISOR model's `configuration`)."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, **options).logits
    log_probability, _, correct = teacher_forced(logits[:, :-1], inputs["labels"][:, 1:])
    return torch.exp(log_probability), correct


def label_configurations(model, batches, show_progress: bool = True, reference_model=None,
                         reference_name: str | None = None) -> LabelTable:
    """Run every configuration on `batches` of (tasks, groups, inputs-with-labels) and build the table; with a
    `reference_model` (a stock model taking the same inputs), also whether it answers each sample."""
    config = model.config
    if model.router is None:
        raise ValueError("labelling needs a model with more than one configuration (and so a router)")
    features, probabilities, corrects, flops, tokens, tasks, groups, references = [], [], [], [], [], [], [], []
    configurations = range(len(config.configurations))
    for batch_tasks, batch_groups, inputs in tqdm(batches, desc="labelling", disable=not show_progress):
        features.append(router_features(model, inputs))
        scores = [score_answers(model, inputs, configuration=index) for index in configurations]
        if reference_model is not None:
            references.append(score_answers(reference_model, inputs)[1])
        probabilities.append(torch.stack([probability for probability, _ in scores], dim=1))
        corrects.append(torch.stack([correct for _, correct in scores], dim=1))
        counts = prompt_tokens(config, inputs)
        tokens.append(counts)
        flops.append(torch.tensor([[llm_prefill_flops(config, visual, text, Schedule.of(config, index)).total
                                    for index in configurations]
                                   for visual, text in counts.tolist()], dtype=torch.int64))
        tasks += batch_tasks
        groups += batch_groups
    reference = dict(reference=torch.cat(references), reference_name=reference_name or "the reference model") \
        if reference_model is not None else {}
    return LabelTable(torch.cat(features).float(), torch.cat(probabilities), torch.cat(corrects), torch.cat(flops),
                      torch.cat(tokens), tasks, groups, model_fingerprint(config), **reference)


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

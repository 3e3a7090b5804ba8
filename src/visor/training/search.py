"""Feasible-configuration discovery after stage 1 (the paper's step 2).

Evaluate subsets of the SA candidates on the validation split, at the model's weights after stage 1:

- exhaustive over all 2^n subsets when there are at most `max_exhaustive` candidates;
- otherwise greedy forward selection: from the CA-only configuration, repeatedly add the candidate layer whose
  addition gives the best accuracy (ties: the earlier layer), which evaluates O(n^2) subsets and yields one
  nested chain.

Cost of a subset = LLM prefill FLOPs (`visor.flops.llm_prefill_flops`) of a prompt with the validation data's mean
visual and text token counts. A subset is kept when no cheaper (or equally cheap) subset is at least as accurate
(the Pareto front); the largest subset (every candidate) is always kept because the router's labels are
relative to it. The model is saved with the kept subsets as its `configurations`, cheapest first (with
`keep_nested`, the nested default prefixes are kept as well), and `search.json` records every evaluated subset.
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any

import torch

from visor.config import Schedule
from visor.evaluation.scoring import evaluate
from visor.files import atomic_folder, write_json
from visor.flops import llm_prefill_flops, prompt_token_counts
from visor.training.data import resolve_data
from visor.training.recipes import is_visor, load_checkpoint


def _token_counts(model, data, settings) -> tuple[int, int]:
    """Mean visual and text tokens per validation prompt (rounded), from one batch of each task."""
    visual = text = rows = 0
    for batch in data.eval_batches("validation", 1, settings.eval_batch_size):
        batch_visual, batch_text = prompt_token_counts(model.config, batch.inputs)
        visual += int(batch_visual.sum())
        text += int(batch_text.sum())
        rows += len(batch_visual)
    return round(visual / rows), round(text / rows)


def _cost_function(model, data, settings):
    visual, text = _token_counts(model, data, settings)

    def cost(subset) -> int:
        return int(llm_prefill_flops(model.config, visual, text, Schedule.with_layers(model.config, subset)).total)

    return cost, f"LLM prefill FLOPs at {visual} visual + {text} text tokens"


def _with_configurations(model, configurations: list[list[int]]):
    """The same weights under a config with new `configurations` (validated; router placed before the first
    optional layer). Modules whose shape follows the configuration list (the policy's router, if the model has
    one) are rebuilt fresh: the router is trained after the search, on labels for the new configurations."""
    config = copy.deepcopy(model.config)
    config.configurations = [list(c) for c in configurations]
    config.router_layer = config.first_optional_layer
    config.forget_router_training()
    config.validate_schedule()
    rebuilt = type(model)(config).to(dtype=model.dtype)
    weights = {key: value for key, value in model.state_dict().items() if not key.startswith("router.")}
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    if unexpected or any(not key.startswith("router.") for key in missing):
        raise ValueError(f"weights do not fit the searched config: missing {missing}, unexpected {unexpected}")
    return rebuilt


def pareto_front(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries not dominated by a cheaper-or-equal, at-least-as-accurate other entry (cheapest first)."""
    ordered = sorted(results, key=lambda r: (r["cost"], -r["accuracy"]["mean"], len(r["layers"])))
    front, best = [], float("-inf")
    for result in ordered:
        if result["accuracy"]["mean"] > best:
            front.append(result)
            best = result["accuracy"]["mean"]
    return front


def search_configurations(
    model_dir: str | os.PathLike,
    data: str,
    output_dir: str | os.PathLike,
    settings,
    keep_nested: bool = False,
    max_exhaustive: int = 6,
) -> dict[str, Any]:
    model = load_checkpoint(model_dir, settings.attn_implementation)
    if not is_visor(model):
        raise ValueError(f"{model_dir} is a stock LLaVA-OV checkpoint: search needs a VISOR model (after stage 1)")
    source = resolve_data(data, model.config, settings.seed, settings, model_dir=model_dir) \
        if isinstance(data, str) else data
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    config = model.config
    candidates = list(config.self_attention_layers)
    nested = [sorted(candidates[:count]) for count in range(len(candidates) + 1)]
    original = [list(c) for c in config.configurations]
    cost, cost_measure = _cost_function(model, source, settings)
    autocast = (lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)) \
        if settings.precision_on(model.device.type) == "bf16" else None
    options = dict(per_task=settings.samples_per_task, batch_size=settings.eval_batch_size,
                   max_new_tokens=settings.max_new_tokens, autocast=autocast)
    evaluated: dict[tuple[int, ...], dict[str, Any]] = {}

    def score(subset) -> dict[str, Any]:
        key = tuple(sorted(subset))
        if key not in evaluated:
            config.configurations = [list(key)]
            try:
                accuracy = evaluate(model, source, split="validation", configuration=0, **options)
            finally:
                config.configurations = original
            evaluated[key] = {"layers": list(key), "accuracy": accuracy, "cost": cost(key)}
        return evaluated[key]

    if len(candidates) <= max_exhaustive:
        method = "exhaustive"
        for size in range(len(candidates) + 1):
            for subset in itertools.combinations(sorted(candidates), size):
                score(subset)
    else:
        method = "greedy"
        chosen: list[int] = []
        score(chosen)
        while len(chosen) < len(candidates):
            options_ = [chosen + [layer] for layer in candidates if layer not in chosen]
            best = max(options_, key=lambda subset: (score(subset)["accuracy"]["mean"], -subset[-1]))
            chosen = sorted(best)
    results = list(evaluated.values())
    front = pareto_front(results)
    kept = {tuple(r["layers"]) for r in front} | {tuple(sorted(candidates))}
    if keep_nested:
        kept |= {tuple(c) for c in nested}
    configurations = [list(c) for c in sorted(kept, key=lambda c: (cost(c), len(c), c))]

    searched = _with_configurations(model, configurations)
    config = searched.config
    report = {
        "model": str(model_dir),
        "method": method,
        "cost_measure": cost_measure,
        "candidates": candidates,
        "previous_configurations": original,
        "configurations": configurations,
        "router_layer": config.router_layer,
        "pareto": [r["layers"] for r in front],
        "evaluated": sorted(results, key=lambda r: (r["cost"], r["layers"])),
        "samples_per_task": settings.samples_per_task,
    }
    with atomic_folder(output_dir, reads=(model_dir,)) as folder:  # the model and its report, or nothing
        searched.save_pretrained(folder, safe_serialization=True)
        write_json(folder / "search.json", report)
    return report

"""`analyze`: the four analyses on one full LLaVA-OV model and one data set, written as JSON and PNG.

    attention_share.json/.png   attention share per layer (validation prompts + the model's greedy answers)
    drift.json/.png             CKA between the image tokens' states at every pair of layers
    sensitivity.json/.png       accuracy with image tokens removed from each span of layers
    placement.json/.png         greedy CA/SA placement, proxy accuracy and FLOPs of each nested configuration,
                                for the proposed and the default (evenly spread) schedule
    visor_config.json           the proposed `VisorConfig` (load with `VisorConfig.from_json_file`)
    trained_comparison.json     with `train_steps`: proposed and default schedules trained alike, then scored
    summary.json                the layers each analysis singles out, and the comparisons at equal FLOPs

Measurements, sensitivity and the search use the validation split; the nested configurations are also scored on
the test split, which the search never saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.analysis import attention_share, cka, compare, placement, sensitivity
from visor.analysis.probe import probe
from visor.analysis.scoring import answer
from visor import VisorConfig
from visor.backbones import backbone_for
from visor.files import write_json


@dataclass(frozen=True)
class AnalysisPlan:
    per_task: int = 40
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 8
    span_lengths: tuple[int, ...] | None = None  # None: every length 1..L
    train_steps: tuple[int, int] | None = None  # (visor-stage1, visor-universal) steps of the trained comparison

    def __post_init__(self):
        for name in ("per_task", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_steps is not None and (len(self.train_steps) != 2 or min(self.train_steps) < 1):
            raise ValueError(f"train_steps must be two positive step counts, got {self.train_steps}")


def load_full_model(path: str | os.PathLike):
    """The stock LLaVA-OV model to analyse (SDPA; the probe switches measured layers to eager)."""
    from visor.training.recipes import is_visor, load_checkpoint

    model = load_checkpoint(path, attn_implementation="sdpa")
    if is_visor(model):
        raise ValueError(f"{path} is a VISOR checkpoint: the analyses run on the full LLaVA-OV model it came from")
    return model.eval()


# The prompt's image and video arguments that the probed forward takes along (its token ids grow by the answer).
VISUAL_INPUTS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")


def task_groups(data) -> dict[str, str]:
    """Task -> "easy"/"hard" when the data source has a suite of grouped tasks (else every task is "all")."""
    suite = getattr(data, "suite", None)
    return {task.name: task.group for task in getattr(suite, "tasks", ())}


@torch.no_grad()
def measure(model, batches, max_new_tokens: int, groups: dict[str, str], progress: bool = True) -> tuple[dict, dict]:
    """Attention shares (every layer measured) and image-token CKA, one probed forward per batch over the prompt
    followed by the model's own greedy answer."""
    num_layers = model.config.text_config.num_hidden_layers
    text_config = model.config.text_config
    backbone = backbone_for(model.config)
    shares = attention_share.ShareAccumulator(num_layers)
    measured = probe(model, measure=range(num_layers), on_weights=shares)
    drift = cka.DriftAccumulator()
    for batch in tqdm(batches, desc="attention and CKA", disable=not progress, leave=False):
        answered = answer(model, batch.inputs, max_new_tokens)
        valid = ((answered != text_config.eos_token_id).cumprod(dim=1).bool()
                 & (answered != text_config.pad_token_id) & ~backbone.visual_token_mask(answered))
        prompt_ids, prompt_mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        input_ids = torch.cat([prompt_ids, torch.where(valid, answered, text_config.pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, valid.to(prompt_mask.dtype)], dim=1)
        visual = backbone.visual_token_mask(input_ids) & attention_mask.bool()
        shares.start_batch(batch.tasks, attention_share.token_groups(visual, attention_mask, prompt_ids.shape[1]))
        pixels = {name: value for name, value in batch.inputs.items() if name in VISUAL_INPUTS}
        with cka.VisualStates(measured.text_stack) as states:
            measured(input_ids=input_ids, attention_mask=attention_mask, **pixels, logits_to_keep=1)
        drift.add(batch.tasks, states.take(), visual)
    return shares.result(groups), drift.result(groups)


def analyze(model_dir: str | os.PathLike, data_spec: str, output: str | os.PathLike,
            plan: AnalysisPlan = AnalysisPlan(), progress: bool = True) -> dict:
    """Run every analysis and write the outputs listed in the module docstring; returns the summary."""
    from visor.training.data import resolve_data

    model = load_full_model(model_dir)
    data = resolve_data(data_spec, model.config, plan.seed)
    num_layers = model.config.text_config.num_hidden_layers
    span_list = sensitivity.spans(num_layers, list(plan.span_lengths) if plan.span_lengths else None)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    groups = task_groups(data)
    validation, test = (list(data.eval_batches(split, plan.per_task, plan.batch_size)) for split in ("validation", "test"))

    shares, drift = measure(model, validation, plan.max_new_tokens, groups, progress)
    write_json(output / "attention_share.json", shares)
    attention_share.plot_attention_shares(shares, output / "attention_share.png")
    write_json(output / "drift.json", drift)
    cka.plot_drift(drift, output / "drift.png")

    sweep = sensitivity.layer_sensitivity(model, data, validation, plan.max_new_tokens, span_list, progress)
    write_json(output / "sensitivity.json", sweep)
    sensitivity.plot_sensitivity(sweep, output / "sensitivity.png")

    default = VisorConfig.from_stock_config(model.config)
    image_share = _mean_over_groups([entry["shares"]["question"]["image"] for entry in shares["task_groups"].values()])
    layer_drift = _mean_over_groups([cka.layer_drift(entry["cka"]) for entry in drift["task_groups"].values()])
    search = placement.greedy_placement(
        model, data, validation, plan.max_new_tokens, len(default.cross_attention_layers),
        len(default.self_attention_layers), image_share, layer_drift, progress)
    proposed = VisorConfig.from_stock_config(model.config, cross_attention_layers=search["cross_attention_layers"],
                                             self_attention_layers=search["self_attention_layers"])
    proposed.to_json_file(output / "visor_config.json")
    splits = {"validation": validation, "test": test}
    rows = [row for config, name in ((proposed, "proposed"), (default, "default"), (default, "full"))
            for row in placement.nested_table(model, data, splits, plan.max_new_tokens, config, name, progress)]
    write_json(output / "placement.json", {**search, "configurations": proposed.configurations, "table": rows})
    placement.plot_placement(rows, output / "placement.png", "validation")

    summary = {
        "model": str(model_dir), "data": data_spec, "per_task": plan.per_task, "seed": plan.seed,
        "full_accuracy": sweep["full"],
        "question_to_image_share": {name: {"layers": entry["shares"]["question"]["image"],
                                           "uniform": entry["uniform"]["question"]["image"]}
                                    for name, entry in shares["task_groups"].items()},
        "image_token_drift": {name: cka.layer_drift(entry["cka"]) for name, entry in drift["task_groups"].items()},
        "single_layer_drop": sensitivity.single_layer_drop(sweep),
        "layers_by_image_share": _ranked(image_share),
        "layers_by_drift": _ranked(layer_drift),
        "layers_by_single_layer_drop": _ranked(sensitivity.single_layer_drop(sweep)),
        "proposed": {"cross_attention_layers": proposed.cross_attention_layers,
                     "self_attention_layers": proposed.self_attention_layers,
                     "configurations": proposed.configurations},
        "default": {"cross_attention_layers": default.cross_attention_layers,
                    "self_attention_layers": default.self_attention_layers,
                    "configurations": default.configurations},
        "equal_flops": _comparison(rows),
    }
    if plan.train_steps:
        trained = compare.compare_trained(model, proposed, default, data, splits, output / "trained",
                                          *plan.train_steps, plan.max_new_tokens, plan.seed, progress)
        write_json(output / "trained_comparison.json", trained)
        summary["trained_equal_flops"] = trained["comparison"]
    write_json(output / "summary.json", summary)
    return summary


def _mean_over_groups(series: list[list[float | None]]) -> list[float]:
    """Per-layer mean over task groups (easy and hard weigh the same), ignoring missing values."""
    columns = zip(*series)
    return [sum(values) / len(values) if (values := [v for v in column if v is not None and v == v]) else 0.0
            for column in columns]


def _ranked(values: list[float | None]) -> list[int]:
    """Layer indices, highest value first (missing values last)."""
    return sorted(range(len(values)), key=lambda layer: (values[layer] is None, -(values[layer] or 0.0)))


def _comparison(rows: list[dict]) -> list[dict]:
    """Proposed vs default mean accuracy per split, configuration by configuration (same FLOPs by construction)."""
    by_schedule = {name: [row for row in rows if row["schedule"] == name] for name in ("proposed", "default")}
    pairs = []
    for proposed, default in zip(by_schedule["proposed"], by_schedule["default"]):
        pairs.append({
            "configuration": proposed["configuration"],
            "flops_ratio": proposed["llm_prefill_flops"] / default["llm_prefill_flops"],
            **{f"{split}_accuracy": {"proposed": round(proposed["accuracy"][split]["mean"], 2),
                                     "default": round(default["accuracy"][split]["mean"], 2),
                                     **placement.paired_comparison(proposed["correct"][split],
                                                                   default["correct"][split])}
               for split in proposed["accuracy"]},
        })
    return pairs


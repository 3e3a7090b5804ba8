"""Trained comparison of the proposed and the default VISOR schedule, both built from the same full model.

The training-free proxy of `placement` predicts; this measures. Each schedule becomes a VISOR model with the
visor-stage1 defaults for its new modules (CA blocks initialised from their host layers, no gate), then trains
with exactly the same recipe, data, seed and steps: `visor-stage1` (new modules only), then `visor-universal`
(everything, one configuration sampled per step). Every nested configuration is then scored on the same
prompts (greedy exact match), so configuration k of one schedule meets configuration k of the other at equal
FLOPs (FLOPs depend only on how many layers are CA and SA).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.analysis.placement import paired_comparison
from visor import VisorConfig
from visor.evaluation.scoring import greedy, new_tokens, score
from visor.files import save_model


def train_schedule(full_model, schedule: VisorConfig, data, output: str | os.PathLike, stage1_steps: int,
                   universal_steps: int, seed: int = 0, batch_size: int = 32, progress: bool = True) -> Path:
    """Build, stage-1 train and universally train a VISOR model with `schedule`'s layers; returns its folder."""
    from visor import VisorForConditionalGeneration
    from visor.training.engine import train
    from visor.training.settings import load_settings

    output = Path(output)
    config = VisorConfig.from_stock_config(
        full_model.config, cross_attention_layers=schedule.cross_attention_layers,
        self_attention_layers=schedule.self_attention_layers, configurations=schedule.configurations,
        cross_attention_init="host", cross_attention_gate=False)
    torch.manual_seed(seed)
    save_model(VisorForConditionalGeneration.from_stock(full_model, config), output / "init")
    common = dict(batch_size=batch_size, seed=seed, eval_every=0, attn_implementation="eager", samples_per_task=10)
    for recipe, steps, init in (("visor-stage1", stage1_steps, output / "init"),
                                ("visor-universal", universal_steps, output / "stage1" / "model")):
        name = recipe.removeprefix("visor-")
        settings = load_settings(recipe, overrides=dict(max_steps=steps, save_every=steps, **common))
        train(recipe, data, output / name, settings, init=str(init), progress=progress)
    return output / "universal" / "model"


@torch.no_grad()
def score_configurations(model, data, splits: dict[str, list], max_new_tokens: int) -> list[dict]:
    """Per configuration of a VISOR model: accuracy and per-prompt correctness on every split."""
    model.eval()
    rows = []
    for index, layers in enumerate(model.config.configurations):
        def generate(inputs, index=index):
            return new_tokens(greedy(model, inputs, max_new_tokens, configuration=index), inputs), None, None

        results = {split: score(data, batches, generate) for split, batches in splits.items()}
        rows.append({"configuration": index, "self_attention_layers": layers,
                     "accuracy": {split: scores.accuracy() for split, scores in results.items()},
                     "correct": {split: scores.correct for split, scores in results.items()}})
    return rows


def compare_trained(full_model, proposed: VisorConfig, default: VisorConfig, data, splits: dict[str, list],
                    output: str | os.PathLike, stage1_steps: int, universal_steps: int, max_new_tokens: int,
                    seed: int = 0, progress: bool = True) -> dict:
    """Train both schedules alike (see the module docstring) and compare them configuration by configuration."""
    from visor import VisorForConditionalGeneration

    schedules = {"proposed": proposed, "default": default}
    scores = {}
    for name, schedule in tqdm(schedules.items(), desc="trained comparison", disable=not progress, leave=False):
        folder = train_schedule(full_model, schedule, data, Path(output) / name, stage1_steps, universal_steps,
                                seed=seed, progress=progress)
        model = VisorForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
        scores[name] = score_configurations(model, data, splits, max_new_tokens)
    pairs = []
    for ours, theirs in zip(scores["proposed"], scores["default"]):
        pairs.append({"configuration": ours["configuration"], **{
            split: {"proposed": round(ours["accuracy"][split]["mean"], 2),
                    "default": round(theirs["accuracy"][split]["mean"], 2),
                    **paired_comparison(ours["correct"][split], theirs["correct"][split])}
            for split in splits}})
    return {"steps": {"visor-stage1": stage1_steps, "visor-universal": universal_steps},
            "schedules": {name: {"cross_attention_layers": s.cross_attention_layers,
                                 "self_attention_layers": s.self_attention_layers} for name, s in schedules.items()},
            "scores": scores, "comparison": pairs}

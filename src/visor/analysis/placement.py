"""Placement search: choose the CA layers and the ordered SA candidate list by measurement.

The search runs on the *full* model, training-free, through a proxy of each VISOR schedule (`probe`):
a CA layer is a **read** layer (text attends to the image tokens with the layer's own attention, image tokens
are not updated: what a CA block initialised from its host layer starts as), an SA layer runs as in the stock
model, every other layer is **blind** (text only). Greedy forward selection on validation accuracy:

1. CA layers: from none, add the layer whose read gives the best mean accuracy, until there are as many as the
   default schedule has (L/3);
2. SA candidates: with those CA layers, add the layer (not CA) whose SA gives the best accuracy, again up to
   the default count. The order of the picks is the candidate order, so the nested configurations (prefixes)
   are the greedy path.

Ties (common with few samples) go to the layer the measurements favour: the highest question→image attention
share for CA, the largest image-token drift (1 - CKA between its input and output) for SA, then the earlier
layer. The proxy accuracy of each nested configuration is the *predicted* accuracy; a trained VISOR model may
do better (its CA blocks learn) — the same proxy is applied to the default schedule, on the same samples and at
the same FLOPs (FLOPs depend only on how many layers are CA and SA), for a like-for-like comparison.
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from visor.analysis.scoring import correctness
from visor import VisorConfig
from visor.evaluation.scoring import Scores
from visor.files import save_figure
from visor.config import Schedule
from visor.flops import llm_prefill_flops, prompt_token_counts


def proxy_correctness(model, data, batches, max_new_tokens: int, cross: list[int],
                      self_attention: list[int]) -> Scores:
    """Per-prompt outcomes of the training-free proxy of a schedule: CA layers read, SA layers full, the rest
    blind."""
    num_layers = model.config.text_config.num_hidden_layers
    blind = [layer for layer in range(num_layers) if layer not in cross and layer not in self_attention]
    return correctness(model, data, batches, max_new_tokens, blind=blind, read=cross)


def proxy_accuracy(model, data, batches, max_new_tokens: int, cross: list[int], self_attention: list[int]) -> dict:
    return proxy_correctness(model, data, batches, max_new_tokens, cross, self_attention).accuracy()


def greedy_placement(model, data, batches, max_new_tokens: int, num_cross: int, num_self: int,
                     cross_preference: list[float], self_preference: list[float], progress: bool = True) -> dict:
    """Greedy CA layers, then an ordered SA candidate list (see the module docstring); every scored step kept."""
    num_layers = model.config.text_config.num_hidden_layers
    steps = [num_layers - k for k in range(num_cross)] + [num_layers - num_cross - k for k in range(num_self)]
    bar = tqdm(total=sum(steps), desc="placement search", disable=not progress, leave=False)
    history: list[dict] = []

    def pick(kind: str, cross: list[int], self_attention: list[int], preference: list[float]) -> int:
        """Score every free layer as one more CA (`kind="cross"`) or SA layer; return the best."""
        scored = {}
        for layer in range(num_layers):
            if layer in cross or layer in self_attention:
                continue
            trial = (cross + [layer], self_attention) if kind == "cross" else (cross, self_attention + [layer])
            scored[layer] = proxy_accuracy(model, data, batches, max_new_tokens, *trial)
            bar.update()
        best = max(scored, key=lambda layer: (scored[layer]["mean"], preference[layer], -layer))
        history.append({"kind": kind, "chosen": best, "cross_attention_layers": list(cross),
                        "self_attention_layers": list(self_attention),
                        "scores": {str(layer): score for layer, score in scored.items()}})
        return best

    cross: list[int] = []
    for _ in range(num_cross):
        cross.append(pick("cross", cross, [], cross_preference))
    cross.sort()
    self_attention: list[int] = []
    for _ in range(num_self):
        self_attention.append(pick("self", cross, self_attention, self_preference))
    bar.close()
    return {"cross_attention_layers": cross, "self_attention_layers": self_attention, "history": history}


def token_counts(config, batches) -> list[tuple[int, int]]:
    """(visual, text) token counts of every prompt, padding excluded."""
    counts = []
    for batch in batches:
        visual, text = prompt_token_counts(config, batch.inputs)
        counts += list(zip(visual.tolist(), text.tolist()))
    return counts


def nested_table(model, data, splits: dict[str, list], max_new_tokens: int, config: VisorConfig, name: str,
                 progress: bool = True) -> list[dict]:
    """Proxy accuracy (per split) and LLM prefill FLOPs (mean over the first split's prompts) of each
    configuration of `config`; with `name="full"`, the one row of the stock model (every layer SA, no CA)."""
    counts = token_counts(config, next(iter(splits.values())))

    def mean_flops(configuration) -> float:
        schedule = Schedule.full(config) if configuration == "full" else Schedule.of(config, configuration)
        return sum(llm_prefill_flops(config, v, t, schedule).total for v, t in counts) / len(counts)

    full = mean_flops("full")
    if name == "full":
        cross, schedules = [], [("full", list(range(config.num_layers)))]
    else:
        cross, schedules = config.cross_attention_layers, list(enumerate(config.configurations))
    rows = []
    for index, layers in tqdm(schedules, desc=f"{name} configurations", disable=not progress, leave=False):
        flops = mean_flops(index)
        scores = {split: proxy_correctness(model, data, batches, max_new_tokens, cross, layers)
                  for split, batches in splits.items()}
        rows.append({
            "schedule": name, "configuration": index, "cross_attention_layers": cross,
            "self_attention_layers": layers, "llm_prefill_flops": flops, "savings": full / flops,
            "accuracy": {split: split_scores.accuracy() for split, split_scores in scores.items()},
            "correct": {split: split_scores.correct for split, split_scores in scores.items()},
        })
    return rows


def paired_comparison(ours: list[bool], theirs: list[bool]) -> dict:
    """Prompts only one schedule answers correctly, and the exact two-sided sign-test p-value of that split
    (is the difference more than the noise of a few dozen prompts per task?)."""
    wins = sum(a and not b for a, b in zip(ours, theirs))
    losses = sum(b and not a for a, b in zip(ours, theirs))
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n if n else 1.0
    return {"only_proposed": wins, "only_default": losses, "sign_test_p": round(min(1.0, 2 * tail), 4)}


def plot_placement(rows: list[dict], path, split: str) -> None:
    """Proxy accuracy against LLM prefill FLOPs for each schedule's nested configurations."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    for name in dict.fromkeys(row["schedule"] for row in rows):
        series = [row for row in rows if row["schedule"] == name]
        label = name if name == "full" else f"{name}: CA {series[0]['cross_attention_layers']}"
        axes.plot([row["llm_prefill_flops"] for row in series], [row["accuracy"][split]["mean"] for row in series],
                  marker="s" if name == "full" else "o", label=label, color="black" if name == "full" else None)
        for row in series:
            if name != "full":
                axes.annotate(f"SA {row['self_attention_layers']}",
                              (row["llm_prefill_flops"], row["accuracy"][split]["mean"]),
                              fontsize="x-small", textcoords="offset points", xytext=(4, 4))
    axes.set(xlabel="LLM prefill FLOPs per sample", ylabel=f"proxy accuracy, {split} (%)",
             title="Nested configurations (training-free proxy)")
    axes.legend(fontsize="small")
    save_figure(figure, path)

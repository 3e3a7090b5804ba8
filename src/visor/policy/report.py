"""The policy report: accuracy, FLOPs, savings and configuration histograms, per task and per group.

Rows for every fixed configuration, for the router at its calibrated τ, and for the oracle (the best
per-sample choice in hindsight), so a reader sees at once whether the dynamic policy lies on or above the
curve of fixed configurations; the router's accuracy and FLOPs at every τ (overall and per group); one
accuracy-vs-FLOPs plot with a panel per group.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from visor.policy.calibration import Outcome, fixed_outcome, oracle_outcome, router_outcome, sweep
from visor.policy.labels import LabelTable


CURVE_POINTS = 200  # thresholds kept per router curve in the report (the sweep may try thousands)


def _subsets(table: LabelTable) -> dict[str, list[int]]:
    """Row indices of the whole table, of each task group and of each task."""
    subsets = {"all": list(range(len(table)))}
    for key, values in (("group", table.groups), ("task", table.tasks)):
        for value in sorted(set(values)):
            subsets[f"{key}:{value}"] = [i for i, v in enumerate(values) if v == value]
    return subsets


def summarise(name: str, outcome: Outcome, table: LabelTable, full_flops: torch.Tensor) -> list[dict]:
    """One row per task, per group and overall: accuracy, mean FLOPs, savings vs the full model, histogram."""
    rows = []
    for subset, indices in _subsets(table).items():
        index = torch.tensor(indices, dtype=torch.long)
        chosen = outcome.flops[index].double().sum()
        rows.append(dict(
            method=name, subset=subset, samples=len(indices),
            accuracy=100.0 * float(outcome.correct[index].float().mean()),
            mean_llm_prefill_flops=float(outcome.flops[index].double().mean()),
            savings=float(full_flops[index].double().sum() / chosen),
            histogram=dict(sorted(Counter(outcome.choice[index].tolist()).items())),
        ))
    return rows


def policy_report(router, table: LabelTable, threshold: float, router_flops: int, full_flops: torch.Tensor) -> dict:
    """Everything `visor policy report` writes, as plain data."""
    rows = []
    for configuration in range(table.num_configurations):
        rows += summarise(f"fixed-{configuration}", fixed_outcome(table, configuration), table, full_flops)
    rows += summarise("router", router_outcome(router, table, threshold, router_flops), table, full_flops)
    rows += summarise("oracle", oracle_outcome(table, router.cost_order), table, full_flops)
    points = sweep(router, table, router_flops)
    kept = points[:: max(len(points) // CURVE_POINTS, 1)]
    points = kept if kept[-1] is points[-1] else kept + points[-1:]
    curves = {}
    for subset, indices in _subsets(table).items():
        if subset.startswith("task:"):
            continue
        index = torch.tensor(indices, dtype=torch.long)
        curves[subset] = [dict(threshold=t, accuracy=100.0 * float(o.correct[index].float().mean()),
                               mean_llm_prefill_flops=float(o.flops[index].double().mean())) for t, o in points]
    return dict(threshold=threshold, rows=rows, router_curves=curves)


def write_report(report: dict, output_dir: str | os.PathLike) -> list[str]:
    """policy_report.json, a Markdown table and an accuracy-vs-FLOPs plot per group."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "policy_report.json")
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=2)
    markdown_path = os.path.join(output_dir, "policy_report.md")
    with open(markdown_path, "w") as handle:
        handle.write(markdown_table(report))
    return [json_path, markdown_path, plot_report(report, os.path.join(output_dir, "policy.png"))]


def markdown_table(report: dict) -> str:
    lines = [f"Router threshold τ = {report['threshold']:.8g}", "",
             "| method | subset | n | accuracy % | mean LLM prefill GFLOPs | savings | configurations chosen |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["subset"].startswith("task:") or row["subset"].startswith("group:") or row["subset"] == "all":
            histogram = " ".join(f"{k}:{v}" for k, v in row["histogram"].items())
            lines.append(f"| {row['method']} | {row['subset']} | {row['samples']} | {row['accuracy']:.1f} | "
                         f"{row['mean_llm_prefill_flops'] / 1e9:.4f} | {row['savings']:.2f}x | {histogram} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = sorted({row["subset"] for row in report["rows"] if row["subset"].startswith("group:")}) or ["all"]
    figure, axes = plt.subplots(1, len(subsets), figsize=(5.5 * len(subsets), 4.2), squeeze=False)
    for axis, subset in zip(axes[0], subsets):
        rows = [row for row in report["rows"] if row["subset"] == subset]
        fixed = sorted((row for row in rows if row["method"].startswith("fixed-")),
                       key=lambda row: row["mean_llm_prefill_flops"])
        axis.plot([r["mean_llm_prefill_flops"] / 1e9 for r in fixed], [r["accuracy"] for r in fixed], "o-",
                  color="tab:gray", label="fixed configurations")
        for row in fixed:
            axis.annotate(row["method"].split("-")[1], (row["mean_llm_prefill_flops"] / 1e9, row["accuracy"]),
                          textcoords="offset points", xytext=(4, -10), fontsize=8)
        curve = report.get("router_curves", {}).get(subset, [])
        axis.plot([point["mean_llm_prefill_flops"] / 1e9 for point in curve], [point["accuracy"] for point in curve],
                  "-", color="tab:blue", alpha=0.4, linewidth=1, label="router, every τ")
        for method, style in (("router", "*"), ("oracle", "D")):
            row = next(r for r in rows if r["method"] == method)
            axis.plot(row["mean_llm_prefill_flops"] / 1e9, row["accuracy"], style, markersize=11, label=method)
        axis.set_title(subset.replace("group:", "") + " tasks")
        axis.set_xlabel("mean LLM prefill GFLOPs per sample")
        axis.set_ylabel("accuracy %")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

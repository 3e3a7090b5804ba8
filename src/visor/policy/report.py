"""The policy report: accuracy, FLOPs, savings and configuration histograms, per task and per group.

Rows for every fixed configuration, for the router at its calibrated τ, and for the oracle (the best
per-sample choice in hindsight), so a reader sees at once whether the dynamic policy lies on or above the
curve of fixed configurations; the router's accuracy and FLOPs at every τ (overall and per group); one
accuracy-vs-FLOPs plot with a panel per group.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from visor.files import save_figure, write_json, write_text
from visor.policy.calibration import Outcome, fixed_outcome, oracle_outcome, router_outcome, sweep
from visor.policy.guarantee import Guarantee, in_points, realised
from visor.policy.labels import LabelTable

CURVE_POINTS = 200  # thresholds kept per router curve in the report (the sweep may try thousands)
NOISE_Z = 1.96  # a gap to the fixed curve within this many standard errors is reported as sampling noise (95%)


def fixed_curve_mix(fixed: list[tuple[float, float]], flops: float) -> list[tuple[int, float]]:
    """The curve of fixed configurations at `flops`, as a mix of configurations: (index into `fixed`, weight).

    `fixed` holds each configuration's (mean FLOPs, accuracy). The curve is the best accuracy reachable at each
    cost (a configuration beaten by a cheaper one counts as that one), linearly interpolated between
    configurations (running two of them on a share of samples each reaches any point between them), held flat
    beyond the cheapest and the dearest."""
    envelope, best = [], None  # (cost, the most accurate configuration costing no more)
    for index in sorted(range(len(fixed)), key=lambda i: fixed[i]):
        if best is None or fixed[index][1] > fixed[best][1]:
            best = index
        envelope.append((fixed[index][0], best))
    if flops <= envelope[0][0]:
        return [(envelope[0][1], 1.0)]
    for (cost0, index0), (cost1, index1) in zip(envelope, envelope[1:]):
        if flops <= cost1:
            if cost1 == cost0:
                return [(index1, 1.0)]
            weight = (flops - cost0) / (cost1 - cost0)
            return [(index0, 1.0 - weight), (index1, weight)]
    return [(envelope[-1][1], 1.0)]


def fixed_curve_accuracy(fixed: list[tuple[float, float]], flops: float) -> float:
    """Accuracy of the fixed-configuration curve at `flops` (see `fixed_curve_mix`)."""
    return sum(weight * fixed[index][1] for index, weight in fixed_curve_mix(fixed, flops))


def against_fixed_curve(table: LabelTable, outcome: Outcome, rows: torch.Tensor) -> dict:
    """How far a routed outcome lies above the fixed curve at its own mean FLOPs, in answers, with the 95% sampling
    noise of that gap. Paired per sample: the curve's answer for a sample is the mix of its configurations'
    answers, so the noise counts only samples where the router and the curve disagree."""
    fixed = [(float(table.flops[rows, c].double().mean()), 100.0 * float(table.correct[rows, c].float().mean()))
             for c in range(table.num_configurations)]
    mix = fixed_curve_mix(fixed, float(outcome.flops[rows].double().mean()))
    curve = sum(weight * table.correct[rows, index].double() for index, weight in mix)
    difference = outcome.correct[rows].double() - curve
    noise = NOISE_Z * float(difference.std()) * len(rows) ** 0.5 if len(rows) > 1 else float("inf")
    return dict(curve_accuracy=100.0 * float(curve.mean()), curve_gap=float(difference.sum()), curve_gap_noise=noise)


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
            **({} if outcome.novel is None else dict(novel=int(outcome.novel[index].sum()))),
        ))
    return rows


def policy_report(router, table: LabelTable, threshold: float, router_flops: int, full_flops: torch.Tensor,
                  guarantee: Guarantee | None = None) -> dict:
    """Everything `visor policy report` writes, as plain data; with the `guarantee` τ was calibrated for, also
    what the policy lost against the table's reference (which the guarantee bounds only for data drawn like its
    calibration samples)."""
    rows = []
    for configuration in range(table.num_configurations):
        rows += summarise(f"fixed-{configuration}", fixed_outcome(table, configuration), table, full_flops)
    routed = router_outcome(router, table, threshold, router_flops)
    router_rows = summarise("router", routed, table, full_flops)
    subsets = _subsets(table)
    for row in router_rows:
        row.update(against_fixed_curve(table, routed, torch.tensor(subsets[row["subset"]], dtype=torch.long)))
    rows += router_rows
    rows += summarise("oracle", oracle_outcome(table), table, full_flops)
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
    novelty = None if router.novelty is None else router.config.router_novelty_threshold
    certified = None if guarantee is None else dict(certificate=guarantee.to_dict(), realised=realised(table, routed),
                                                    reference_on_this_table=table.reference_name)
    return dict(threshold=threshold, novelty_threshold=novelty, rows=rows, router_curves=curves, guarantee=certified)


def write_report(report: dict, output_dir: str | os.PathLike) -> list[str]:
    """policy_report.json, a Markdown table and an accuracy-vs-FLOPs plot per group."""
    folder = Path(output_dir)
    return [write_json(folder / "policy_report.json", report), write_text(folder / "policy_report.md",
            markdown_table(report)), plot_report(report, folder / "policy.png")]


def markdown_table(report: dict) -> str:
    guard = report.get("novelty_threshold")
    lines = [f"Router threshold τ = {report['threshold']:.8g}"
             + ("" if guard is None else f"; novelty guard κ = {guard:.4g}"), "",
             *guarantee_lines(report.get("guarantee")),
             "| method | subset | n | accuracy % | mean LLM prefill GFLOPs | savings | configurations chosen |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["subset"].startswith("task:") or row["subset"].startswith("group:") or row["subset"] == "all":
            histogram = " ".join(f"{k}:{v}" for k, v in row["histogram"].items())
            if row.get("novel"):
                histogram += f" ({row['novel']} flagged novel)"
            lines.append(f"| {row['method']} | {row['subset']} | {row['samples']} | {row['accuracy']:.1f} | "
                         f"{row['mean_llm_prefill_flops'] / 1e9:.4f} | {row['savings']:.2f}x | {histogram} |")
    return "\n".join(lines) + "\n"


def guarantee_lines(stored: dict | None) -> list[str]:
    """The guarantee τ was calibrated for and what the policy lost on this table (Markdown lines)."""
    if stored is None:
        return []
    guarantee = Guarantee(**stored["certificate"])
    lost = stored["realised"]
    return [f"Guarantee: {guarantee.describe()}.", "",
            f"On these {lost['samples']} samples the policy lost {100 * lost['loss']:.2f} points against "
            f"{stored['reference_on_this_table']} ({lost['accuracy']:.1f}% vs {lost['reference_accuracy']:.1f}%): "
            f"{'within' if lost['loss'] <= guarantee.max_loss else 'BEYOND'} the {in_points(guarantee.max_loss)} "
            "promised for data drawn like the calibration samples (elsewhere the guarantee does not apply).", ""]


def plot_report(report: dict, path: str) -> str:
    from matplotlib.figure import Figure

    subsets = sorted({row["subset"] for row in report["rows"] if row["subset"].startswith("group:")}) or ["all"]
    figure = Figure(figsize=(5.5 * len(subsets), 4.2), layout="tight")
    axes = figure.subplots(1, len(subsets), squeeze=False)
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
    return save_figure(figure, path)

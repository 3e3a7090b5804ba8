"""The demo's outputs: results.json (one row per method x setting x task), report.md, pareto.png, a summary.

Every number comes from the per-sample scores the evaluate stage saved; nothing is typed in. Savings are
always the full model's mean LLM-prefill FLOPs on the same samples divided by the method's. The verdicts in
report.md are computed from the rows, so they say "not met" as readily as "met".
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from visor.evaluation.scoring import Scores
from visor.files import save_figure, write_json, write_text
from visor.policy.guarantee import in_points
from visor.policy.report import fixed_curve_accuracy

ROUNDING = 1e-6  # gaps in answers smaller than this are float rounding, not a difference

FULL = ("full", "all tokens")
POLICY = ("visor-policy", "auto")
TRAINED = ("full-fine-tuned", "pool-fine-tuned", "m3")  # `visor demo --trained-baselines`: their own group
TARGETS = {"accuracy_gap": 1.0, "hard_savings": 3.0, "easy_savings": 10.0,  # the demo's targets (docs/demo.md)
           "full_hard_task": 80.0, "full_easy_task": 95.0}  # the full model's, every task of the group


def _aggregate(method: str, setting: str, scores: Scores, indices: list[int], full: Scores, task: str,
               group: str, majority: float | None) -> dict:
    flops = sum(scores.flops[i] for i in indices)
    full_flops = sum(full.flops[i] for i in indices)
    row = dict(method=method, setting=setting, task=task, group=group, samples=len(indices),
               accuracy=100.0 * sum(scores.correct[i] for i in indices) / len(indices),
               majority=majority, llm_prefill_flops=flops / len(indices), savings=full_flops / flops)
    chosen = [scores.configurations[i] for i in indices if scores.configurations[i] is not None]
    if chosen:
        row["histogram"] = {str(k): v for k, v in sorted(Counter(chosen).items())}
    return row


def build_results(systems: list[tuple[str, str, Scores]], groups: dict[str, str], majority: dict[str, float],
                  plan: dict, stages: dict) -> dict:
    """Rows per task and per group for every system, plus what produced them."""
    by_key = {(method, setting): scores for method, setting, scores in systems}
    full = by_key[FULL]
    for method, setting, scores in systems:
        if scores.tasks != full.tasks:
            raise ValueError(f"{method} {setting} was scored on other samples than the full model")
    rows, group_rows = [], []
    tasks = list(dict.fromkeys(full.tasks))
    for method, setting, scores in systems:
        for task in tasks:
            indices = [i for i, t in enumerate(scores.tasks) if t == task]
            rows.append(_aggregate(method, setting, scores, indices, full, task, groups[task], majority.get(task)))
        for group in sorted(set(groups[t] for t in tasks)):
            indices = [i for i, t in enumerate(scores.tasks) if groups[t] == group]
            group_rows.append(_aggregate(method, setting, scores, indices, full, f"all {group}", group, None))
    return dict(rows=rows, groups=group_rows, plan=plan, stages=stages)


def write_outputs(results: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "report.md", folder / "pareto.png"]
    write_json(paths[0], results)
    write_text(paths[1], markdown(results))
    plot_pareto(results, paths[2])
    return paths


# ---- verdicts -----------------------------------------------------------------------------------------------
def setting_order(setting: str) -> tuple:
    """FLOPs ratios ("2x", "11x") in numeric order, before any other setting (kept in text order)."""
    number = setting.removesuffix("x")
    return (0, float(number), "") if number.replace(".", "", 1).isdigit() else (1, 0.0, setting)


def at_or_below_majority(results: dict, key: tuple[str, str], group: str | None = None) -> tuple[list[str], int]:
    """The tasks (of `group`, or all) on which a system's accuracy is at most the majority class's, and how many
    tasks there are: the yardstick for "reads nothing of the image" (text-only is not one: it may answer one
    constant that happens to be rare)."""
    rows = [r for r in results.get("rows", []) if (r["method"], r["setting"]) == key and group in (None, r["group"])]
    return [r["task"] for r in rows if r["accuracy"] <= r["majority"]], len(rows)


def _group(results: dict, key: tuple[str, str], group: str) -> dict | None:
    return next((r for r in results["groups"] if (r["method"], r["setting"]) == key and r["group"] == group), None)


def verdicts(results: dict) -> list[str]:
    """Plain sentences on the demo's targets, computed from the rows."""
    lines = []
    for group in ("hard", "easy"):
        tasks = [r for r in results.get("rows", []) if (r["method"], r["setting"]) == FULL and r["group"] == group]
        if tasks:
            target = TARGETS[f"full_{group}_task"]
            met = all(r["accuracy"] >= target for r in tasks)
            accuracies = ", ".join(f"{r['task']} {r['accuracy']:.1f}%" for r in tasks)
            verdict = "met" if met else "NOT met"
            lines.append(f"full model on every {group} task >= {target:g}% ({accuracies}): {verdict}.")
    for group in ("hard", "easy"):
        full, policy = _group(results, FULL, group), _group(results, POLICY, group)
        if full is None or policy is None:
            continue
        gap = full["accuracy"] - policy["accuracy"]
        target = TARGETS[f"{group}_savings"]
        lines.append(
            f"{group} tasks: VISOR policy {policy['accuracy']:.1f}% vs full {full['accuracy']:.1f}% "
            f"({'within' if gap <= TARGETS['accuracy_gap'] else 'NOT within'} {TARGETS['accuracy_gap']:g} point), "
            f"{policy['savings']:.2f}x LLM-prefill savings (target {target:g}x: {'met' if policy['savings'] >= target else 'not met'})."
        )
    policy = results["stages"].get("policy", {})
    budget = f"at τ = {policy.get('budget_threshold', float('nan')):.8g}, a budget halfway between the two cheapest configurations"
    for split, title in (("test", "test split"), ("variants", "held-out task variants"),
                         ("budget_test", f"test split {budget}"), ("budget_variants", f"held-out task variants {budget}")):
        if policy.get(split):
            lines += policy_curve_verdicts(policy[split], title)
    for split, title in (("test", "test split"), ("variants", "held-out task variants")):
        if policy.get(split) and policy.get(f"{split}_curves"):
            lines += router_curve_verdicts(policy[split], policy[f"{split}_curves"], title)
    lines += guarantee_verdicts(policy.get("guarantee"))
    lines += trained_verdicts(results)
    hard_policy = _group(results, POLICY, "hard")
    if hard_policy is not None:
        for method in sorted({r["method"] for r in results["groups"]} - {"full", "text-only", "visor", "visor-policy",
                                                                         *TRAINED}):
            candidates = [r for r in results["groups"] if r["method"] == method and r["group"] == "hard"]
            # Ties (an in-LLM method stuck at its strongest reduction) go to the weakest setting asked for.
            nearest = min(candidates, key=lambda r: (abs(r["savings"] - hard_policy["savings"]),
                                                     setting_order(r["setting"])))
            better = hard_policy["accuracy"] > nearest["accuracy"]
            below, total = at_or_below_majority(results, (method, nearest["setting"]), "hard")
            lines.append(
                f"{method} at {nearest['setting']} ({nearest['savings']:.2f}x, nearest to the policy's "
                f"{hard_policy['savings']:.2f}x on hard tasks): {nearest['accuracy']:.1f}% on hard tasks, at or "
                f"below the majority class on {len(below)} of {total} — "
                f"VISOR policy {'beats it' if better else 'does NOT beat it'} ({hard_policy['accuracy']:.1f}%)."
            )
    return lines


GUARANTEE_SPLITS = (("test", "test split", True), ("variants", "held-out task variants", False))  # applies?


def guarantee_verdicts(guarantee: dict | None) -> list[str]:
    """The budget with a guarantee: what was certified on validation and what it lost on test and variants."""
    if not guarantee:
        return []
    promise = f"{in_points(guarantee['max_loss'])} against {guarantee['reference']}"
    lines = [f"Budget with a guarantee (lose at most {promise}, confidence {guarantee['confidence']:g}, "
             f"{guarantee['samples']} validation samples): "
             + (f"τ = {guarantee['threshold']:.6g} certified ({guarantee['losses']} validation samples lost, upper "
                f"bound {100 * guarantee['bound']:.2f} points)." if guarantee["certified"] else
                "no τ certified, so the largest configuration runs for every input.")]
    for split, title, applies in GUARANTEE_SPLITS:
        lost = guarantee[split]
        within = lost["loss"] <= guarantee["max_loss"]
        lines.append(
            f"Guaranteed budget on the {title} ("
            + ("drawn like the validation split: the guarantee applies" if applies else
               "not drawn like the validation split: the guarantee does NOT apply, shown anyway")
            + f"): lost {100 * lost['loss']:.2f} points (the share of samples the full model answers and it does "
            f"not), {'within' if within else 'BEYOND'} {100 * guarantee['max_loss']:g}; accuracy "
            f"{lost['accuracy']:.1f}% vs {lost['reference_accuracy']:.1f}% for the full model "
            f"({abs(lost['accuracy_drop']):.2f} points {'lower' if lost['accuracy_drop'] >= 0 else 'higher'}); "
            f"{lost['savings']:.2f}x LLM-prefill savings."
        )
    return lines


def trained_verdicts(results: dict) -> list[str]:
    """Each trained baseline at the setting nearest the policy's FLOPs, against the policy (and the full model as
    shipped, or the same method untrained), per task group."""
    trained = results["stages"].get("trained")
    if not trained:
        return []
    lines = []
    for group in ("hard", "easy"):
        full, policy = _group(results, FULL, group), _group(results, POLICY, group)
        for method in TRAINED:
            rows = [r for r in results["groups"] if r["method"] == method and r["group"] == group]
            if not rows:
                continue
            row = min(rows, key=lambda r: abs(r["savings"] - policy["savings"]))
            untrained = full if method == "full-fine-tuned" else _group(results, ("pool", row["setting"]), group)
            compared = ("the full model as shipped" if method == "full-fine-tuned" else f"pool at {row['setting']} untrained"
                        if untrained else None)
            seconds = trained["trained"][f"{row['method']}@{row['setting']}"]["training_seconds"]
            lines.append(
                f"Equal training budget, {group} tasks: {method} at {row['setting']} ({row['savings']:.2f}x, "
                f"{trained['steps']} steps, {seconds} s) {row['accuracy']:.1f}%"
                + (f" ({compared}: {untrained['accuracy']:.1f}%)" if compared else "")
                + f" vs VISOR's policy {policy['accuracy']:.1f}% at {policy['savings']:.2f}x — VISOR "
                + ("beats it" if policy["accuracy"] > row["accuracy"] else "does NOT beat it") + ".")
    return lines


def guarantee_table(guarantee: dict | None) -> list[str]:
    """Markdown rows: the certified τ on the test split and the held-out variants."""
    if not guarantee:
        return []
    lines = ["", "## Table 5: the budget with a guarantee", "",
             f"τ certified on the validation split ({guarantee['samples']} samples) to lose at most "
             f"{in_points(guarantee['max_loss'])} against {guarantee['reference']} with confidence "
             f"{guarantee['confidence']:g} (`visor.policy.guarantee`); loss: the share of samples the full model "
             "answers and the policy does not." + ("" if guarantee["certified"] else
                                                    " No τ was certified: τ = 1, the largest configuration."), "",
             "| split | guarantee applies | τ | savings | full model acc % | policy acc % | loss (points) | within ε |",
             "|---|---|---|---|---|---|---|---|"]
    for split, title, applies in GUARANTEE_SPLITS:
        lost = guarantee[split]
        lines.append(f"| {title} | {'yes' if applies else 'no (not exchangeable)'} | {guarantee['threshold']:.6g} | "
                     f"{lost['savings']:.2f}x | {lost['reference_accuracy']:.1f} | {lost['accuracy']:.1f} | "
                     f"{100 * lost['loss']:.2f} | {'yes' if lost['loss'] <= guarantee['max_loss'] else 'NO'} |")
    return lines


def trained_table(results: dict) -> list[str]:
    """Markdown rows: the trained baselines next to the full model and the policy, with their training cost."""
    trained = results["stages"].get("trained")
    if not trained:
        return []
    lines = ["", "## Table 6: trained baselines (equal training budget)", "",
             f"Each trained with recipe `full` from the shipped full model for as many steps as VISOR's conversion "
             f"({trained['steps']}: stage 1 + universal), on the same data, batch size and seed, at universal "
             f"training's learning rate ({trained['learning_rate']:g}), without the shipped model's auxiliary loss "
             "(`visor demo --trained-baselines`). pool-fine-tuned reads pooled images at one stride, m3 at one of "
             "its nested strides per step (Matryoshka-style) and is scored at each.", "",
             "| method | setting | hard acc % | hard savings | easy acc % | easy savings | training s |",
             "|---|---|---|---|---|---|---|"]
    keys = [FULL, *dict.fromkeys((r["method"], r["setting"]) for r in results["groups"] if r["method"] in TRAINED),
            POLICY]
    for key in keys:
        hard, easy = _group(results, key, "hard"), _group(results, key, "easy")
        cost = trained["trained"].get(f"{key[0]}@{key[1]}", {}).get("training_seconds", "—")
        lines.append(f"| {key[0]} | {key[1]} | {hard['accuracy']:.1f} | {hard['savings']:.2f}x | {easy['accuracy']:.1f} | "
                     f"{easy['savings']:.2f}x | {cost} |")
    return lines


def router_against_fixed_curve(rows: list[dict]) -> dict[str, tuple[dict, float]]:
    """Per task group of a policy report: the router's row and the fixed curve's accuracy at the router's FLOPs."""
    compared = {}
    for subset in sorted({row["subset"] for row in rows if row["subset"].startswith("group:")}):
        group = [row for row in rows if row["subset"] == subset]
        router = next(row for row in group if row["method"] == "router")
        fixed = [(row["mean_llm_prefill_flops"], row["accuracy"]) for row in group if row["method"].startswith("fixed-")]
        compared[subset.removeprefix("group:")] = router, fixed_curve_accuracy(fixed, router["mean_llm_prefill_flops"])
    return compared


def policy_curve_verdicts(rows: list[dict], title: str) -> list[str]:
    """The demo's checks on one policy report: router on or above the fixed curve; fewer FLOPs on easy tasks."""
    lines = []
    compared = router_against_fixed_curve(rows)
    for group, (router, curve) in compared.items():
        samples = (router["accuracy"] - curve) * router["samples"] / 100  # the gap in answers, to judge noise
        noise = router.get("curve_gap_noise")
        lines.append(
            f"Policy on the {title}, {group} tasks: router {router['accuracy']:.2f}% at "
            f"{router['savings']:.2f}x vs {curve:.2f}% for fixed configurations at the same FLOPs — "
            f"{'on or above' if router['accuracy'] >= curve - 1e-9 else 'BELOW'} the fixed curve by "
            f"{_answers(abs(samples))} of {router['samples']} answers"
            + ("" if noise is None else f", {'within' if abs(samples) <= noise + ROUNDING else 'beyond'} sampling noise "
                                        f"(±{_answers(noise)} at 95%)")
            + f" (configurations chosen: {_histogram(router['histogram'])}"
            + (f"; {router['novel']} flagged novel" if router.get("novel") else "") + ")."
        )
    if {"hard", "easy"} <= compared.keys():
        easy, hard = (compared[group][0]["mean_llm_prefill_flops"] for group in ("easy", "hard"))
        # Prompt lengths differ between groups, so say how much of each is the router's own spending.
        extra = {group: compared[group][0]["mean_llm_prefill_flops"] - min(
            row["mean_llm_prefill_flops"] for row in rows
            if row["subset"] == f"group:{group}" and row["method"].startswith("fixed-")) for group in ("easy", "hard")}
        lines.append(f"Policy on the {title}: {'fewer' if easy < hard else 'NOT fewer'} mean LLM-prefill FLOPs on easy "
                     f"tasks ({_gflops(easy)} GFLOPs) than on hard ones ({_gflops(hard)}); spent beyond the cheapest "
                     f"configuration (router included): easy {_gflops(extra['easy'])}, hard {_gflops(extra['hard'])}.")
    return lines


def router_curve_verdicts(rows: list[dict], curves: dict[str, list[dict]], title: str) -> list[str]:
    """The router at every τ of its sweep against the fixed curve, per task group: one calibrated τ is one
    point, the whole curve says whether per-sample choice pays at any budget."""
    lines = []
    for subset in sorted(name for name in curves if name.startswith("group:")):
        group = [row for row in rows if row["subset"] == subset]
        fixed = [(row["mean_llm_prefill_flops"], row["accuracy"]) for row in group if row["method"].startswith("fixed-")]
        samples = next(row["samples"] for row in group if row["method"] == "router")
        gaps = [((point["accuracy"] - fixed_curve_accuracy(fixed, point["mean_llm_prefill_flops"])) * samples / 100,
                 point["mean_llm_prefill_flops"]) for point in curves[subset]]
        (best, best_at), (worst, worst_at) = max(gaps), min(gaps)
        lines.append(
            f"Router at every τ on the {title}, {subset.removeprefix('group:')} tasks: on or above the fixed curve "
            f"at {sum(gap >= -1e-9 for gap, _ in gaps)} of {len(gaps)} thresholds; largest gain {_answers(max(0.0, best))} "
            f"of {samples} answers (at {_gflops(best_at)} GFLOPs), largest shortfall {_answers(max(0.0, -worst))} "
            f"(at {_gflops(worst_at)})."
        )
    return lines


def _answers(count: float) -> str:
    """A gap in answers: one decimal, or two significant digits when smaller (the router's own FLOPs alone put it
    a hair beside the curve); below a millionth, rounding error of the float sums, zero."""
    return f"{count:.1f}" if count >= 0.05 or count < ROUNDING else f"{count:.2g}"


def _histogram(histogram: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in histogram.items())


# ---- Markdown ------------------------------------------------------------------------------------------------
def _gflops(value: float) -> str:
    return f"{value / 1e9:.4f}"


def group_table(results: dict) -> list[str]:
    """Markdown rows: accuracy, GFLOPs and savings per task group for every system, and its tasks at or below the
    majority class."""
    keys = list(dict.fromkeys((r["method"], r["setting"]) for r in results["groups"]))
    groups = sorted({r["group"] for r in results["groups"]})
    lines = ["| method | setting | " + " | ".join(f"{g} acc % | {g} GFLOPs | {g} savings" for g in groups)
             + " | tasks at or below the majority class |", "|---|---|" + "---|---|---|" * len(groups) + "---|"]
    for key in keys:
        cells = []
        for group in groups:
            row = _group(results, key, group)
            cells += [f"{row['accuracy']:.1f}", _gflops(row["llm_prefill_flops"]), f"{row['savings']:.2f}x"]
        below, total = at_or_below_majority(results, key)
        cells.append(f"{len(below)} of {total}" + (f" ({', '.join(below)})" if below else ""))
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    plan, stages = results["plan"], results["stages"]
    keys = list(dict.fromkeys((r["method"], r["setting"]) for r in results["groups"]))
    suite = plan.get("suite", "demo")
    command = "`make demo`" if suite == "demo" else f"`visor demo --suite {suite}`"
    lines = ["# VISOR demo report", "",
             f"Produced by `visor demo` (suite `{suite}`, as {command} runs it); every number below is measured in "
             "that run."]
    rescored = stages.get("rescored")
    if rescored:
        lines[-1] += (f" The rows of {', '.join(rescored['methods'])} were scored again later on the same full model "
                      f"(code at commit {rescored['commit']}, `scripts/rescore_baselines.py`; the full model's rows "
                      "came out identical)" + (f"; the rows of {', '.join(rescored['dropped'])} were removed (measured "
                      "with code since changed, on this run's VISOR models, which are not kept)"
                                               if rescored["dropped"] else "") + ".")
    for added in stages.get("added", []):
        lines[-1] += (f" The rows of {', '.join(added['methods'])} were added later on the same full model (code at "
                      f"commit {added['commit']}, `scripts/rescore_baselines.py`; the full model's rows came out "
                      "identical).")
    lines += ["", "## Verdicts", ""]
    lines += [f"- {line}" for line in verdicts(results)]
    lines += ["", "## Table 1: accuracy and LLM-prefill FLOPs per task group (test split)", "",
              "Last column: the tasks on which the method does no better than always giving the task's most common "
              "answer (Table 2's first row); a method that reads nothing of the image lands there.", ""]
    lines += group_table(results)
    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    lines += ["", "## Table 2: accuracy per task (%), majority-class baseline in the first row", "",
              "| method | setting | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    majority = {r["task"]: r["majority"] for r in results["rows"]}
    lines.append("| majority class | — | " + " | ".join(f"{majority[t]:.1f}" for t in tasks) + " |")
    for key in keys:
        accuracy = {r["task"]: r["accuracy"] for r in results["rows"] if (r["method"], r["setting"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{accuracy[t]:.1f}" for t in tasks) + " |")
    lines += ["", "## Table 3: configurations the policy chose (test split)", "",
              "| task | " + " | ".join(["configuration: samples"]) + " |", "|---|---|"]
    for row in results["rows"] + results["groups"]:
        if (row["method"], row["setting"]) == POLICY:
            lines.append(f"| {row['task']} | {_histogram(row.get('histogram', {}))} |")
    variants = plan.get("variants", "demo-variants")
    for split, title in (("test", "test split"), ("variants", f"held-out task variants (`{variants}`, unseen knobs)")):
        rows = stages.get("policy", {}).get(split)
        if rows:
            lines += ["", f"## Table 4{'a' if split == 'test' else 'b'}: the policy against every fixed configuration, {title}", "",
                      "| subset | method | n | accuracy % | GFLOPs | savings | configurations chosen |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['subset']} | {r['method']} | {r['samples']} | {r['accuracy']:.1f} | "
                      f"{_gflops(r['mean_llm_prefill_flops'])} | {r['savings']:.2f}x | {_histogram(r['histogram'])} |"
                      for r in rows]
    lines += guarantee_table(stages.get("policy", {}).get("guarantee"))
    lines += trained_table(results)
    easy_vqa = [r for r in results["rows"] if r["task"] == "easy_vqa" and (r["method"], r["setting"]) in (FULL, POLICY)]
    if easy_vqa:
        lines += ["", "## easy-VQA (real images and questions)", "", "| method | accuracy % | savings |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['accuracy']:.1f} | {r['savings']:.2f}x |" for r in easy_vqa]
    policy = stages.get("policy", {})
    lines += ["", "## How this was produced", "",
              f"- Plan: `{json.dumps(plan)}`.",
              f"- Policy: a {plan.get('router_mode', 'multilabel')} router; τ = "
              f"{policy.get('threshold', float('nan')):.8g}, calibrated on the validation split "
              f"({policy.get('validation_samples', '?')} samples) as the "
              "cheapest threshold within half a point of the largest configuration's validation accuracy (or, if none "
              "gets that close, the most accurate one)."
              + ("" if policy.get("novelty_threshold") is None else
                 f" Novelty guard: κ = {policy['novelty_threshold']:.4g}, the {plan.get('novelty_quantile')} quantile "
                 "of the router's training samples' local outlier scores; an input scoring above it skips CA-only "
                 "(\"flagged novel\" in the verdicts)."),
              f"- Baselines: at the plan's FLOPs ratios {list(plan['ratios'])} and at the policy's own savings on "
              f"validation ({policy.get('validation_policy_savings', float('nan')):.1f}x), each strength matched on one "
              "validation batch; in-LLM methods cannot go below their full first layers, so their rows say what they "
              "reached.",
              f"- Test data: the `{plan.get('suite', 'demo')}` suite's test split, seed "
              f"{plan['seed']}: sample i of task T is drawn from SeedSequence((seed, 2, crc32(T), i)); training uses "
              "split id 0 and validation split id 1, so the streams are disjoint. easy-VQA uses the package's own "
              "test images (training and validation come from its training images). The held-out task variants "
              f"(`{plan.get('variants', 'demo-variants')}`) draw the test split's seeds with knobs no training stage uses.",
              "- Stage times (s): " + ", ".join(f"{k} {v.get('seconds', '?')}" for k, v in stages.items()
                                                  if isinstance(v, dict)) + ".",
              "- FLOPs: `visor.flops` (exact against torch's FlopCounterMode with eager attention); LLM prefill only.",
              "", "Commands: `make demo` (= `visor demo --output runs/demo`), `make demo-two-hop` (= `visor demo "
              "--suite two-hop --output runs/demo-two-hop`), `visor demo --quick` for a smoke run, `visor demo --fresh` "
              "to recompute every stage.", ""]
    return "\n".join(lines)


def summary_text(results: dict) -> str:
    return "\n".join(["", *group_table(results), "", *verdicts(results)])


# ---- plot ------------------------------------------------------------------------------------------------------
def plot_pareto(results: dict, path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    groups = sorted({r["group"] for r in results["groups"]})
    figure = Figure(figsize=(6 * len(groups), 4.5), layout="tight")
    axes = figure.subplots(1, len(groups), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results["groups"]))
    colours = colormaps["tab20"]  # 20 distinct colours: every method gets its own
    for axis, group in zip(axes[0], groups):
        for index, method in enumerate(methods):
            points = sorted((r["llm_prefill_flops"] / 1e9, r["accuracy"]) for r in results["groups"]
                            if r["method"] == method and r["group"] == group)
            visor = method.startswith("visor")
            style = dict(marker="*", markersize=16, zorder=5) if method == "visor-policy" else dict(marker="o")
            axis.plot(*zip(*points), label=method, color=colours(index % 20), linewidth=2.5 if visor else 1.2,
                      linestyle="-" if visor or method == "full" else "--", **style)
        axis.set_xscale("log")
        axis.set_xlabel("mean LLM prefill GFLOPs per sample (log)")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"{group} tasks")
        axis.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)

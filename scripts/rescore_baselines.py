"""Re-score token-reduction baselines of a committed demo run after their code changed, or add new ones, without
retraining VISOR.

    python scripts/rescore_baselines.py docs/demo --methods visionzip,hired [--drop visor+visionzip]
    python scripts/rescore_baselines.py docs/demo --methods random,dart,random-pre-llm      # not in the run yet: added

The baselines applied to the stock model need only the run's shipped full model, so they can be scored again
exactly as `visor demo` scores them (same plan, test prompts, FLOPs ratios and code path). The full model is
scored again first, and nothing is written unless its rows equal the committed ones: the new rows must stand on
the same ground as the old. `--drop` removes the rows of methods that need the run's own VISOR models (not kept
in the repository), so that no row measured with the old code stays. Methods the run does not have yet are added
at the same ratios. results.json, report.md and pareto.png are rewritten in place, and results.json records what
was re-scored and what was added (`stages.rescored`, `stages.added`, one record per addition).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from visor.demo import report
from visor.demo.pipeline import EVAL_BATCH, Demo, DemoPlan
from visor.evaluation.scoring import score


def plan_of(results: dict) -> DemoPlan:
    """The run's plan, with JSON lists back as the tuples `DemoPlan` holds."""
    tuples = {field.name for field in fields(DemoPlan) if "tuple" in str(field.type)}
    return DemoPlan(**{key: tuple(value) if key in tuples and value is not None else value
                       for key, value in results["plan"].items()})


def rescore(folder: Path, methods: list[str], dropped: list[str]) -> dict:
    results = json.loads((folder / "results.json").read_text())
    torch.set_num_threads(results["plan"]["num_threads"])
    with tempfile.TemporaryDirectory() as scratch:
        demo = Demo(Path(scratch), plan_of(results))
        demo.prepare(fresh=False)
        # The policy stage's record says at which ratio the baselines also matched the policy's FLOPs.
        demo._finish("policy", results["stages"]["policy"])
        chosen = [(method, setting, build) for method, setting, build in demo.stock_systems()
                  if method == "full" or method in methods]
        unknown = sorted(set(methods) - {method for method, _, _ in chosen})
        if unknown:
            raise SystemExit(f"not stock-model baselines of this run: {', '.join(unknown)}")
        start = time.perf_counter()
        test = list(demo.data.eval_batches("test", demo.plan.test_per_task, EVAL_BATCH))
        scored = [(method, setting, score(demo.data, test, build(), f"{method} {setting}", progress=True))
                  for method, setting, build in chosen]
    groups = {task.name: task.group for task in demo.data.suite.tasks}
    majority = demo.data.majority_baseline("test", demo.plan.test_per_task)
    new = report.build_results(scored, groups, majority, results["plan"], results["stages"])
    for part in ("rows", "groups"):
        old_full = [row for row in results[part] if (row["method"], row["setting"]) == report.FULL]
        new_full = [row for row in new[part] if (row["method"], row["setting"]) == report.FULL]
        if old_full != new_full:
            raise SystemExit(f"the full model's {part} differ from the committed run here; nothing written:\n"
                             f"committed {old_full}\nnow       {new_full}")
    present = {row["method"] for row in results["rows"]}
    added = [method for method in methods if method not in present]
    for part in ("rows", "groups"):  # each re-scored row takes the place of the row it replaces; added ones join
        rescored = {(row["method"], row["setting"], row["task"]): row for row in new[part] if row["method"] in methods}
        rows = [rescored.get((row["method"], row["setting"], row["task"]), row) for row in results[part]
                if row["method"] not in dropped] + [row for row in new[part] if row["method"] in added]
        results[part] = sorted(rows, key=lambda row: (row["method"], report.setting_order(row["setting"])))  # stable
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    seconds = round(time.perf_counter() - start, 1)
    if set(methods) - set(added) or dropped:
        results["stages"]["rescored"] = dict(methods=[m for m in methods if m not in added], dropped=dropped,
                                             commit=commit, seconds=seconds)
    if added:
        results["stages"]["added"] = [*results["stages"].get("added", []), dict(methods=added, commit=commit,
                                                                                seconds=seconds)]
    report.write_outputs(results, folder)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a committed demo run (results.json, report.md, pareto.png)")
    parser.add_argument("--methods", required=True, help="comma-separated stock-model baselines to score again")
    parser.add_argument("--drop", default="", help="comma-separated methods whose rows to remove")
    args = parser.parse_args(argv)
    if not (args.folder / "results.json").is_file():
        raise SystemExit(f"{args.folder} holds no results.json")
    methods, dropped = ([name for name in value.split(",") if name] for value in (args.methods, args.drop))
    results = rescore(args.folder, methods, dropped)
    print(report.summary_text(results))


if __name__ == "__main__":
    sys.exit(main())

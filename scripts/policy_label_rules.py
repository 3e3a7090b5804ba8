"""Does another router label rule or head beat the fixed configurations on a finished demo run?

Retrains the router of `DEMO_DIR/universal/model` on the label tables the demo's policy stage saved, once per
label rule ("good" = answer probability within 99% of the largest configuration's, or greedy correctness) and
router head (multilabel or the paper's softmax), calibrates τ as the demo does, and prints for the test split
and the held-out task variants the router's accuracy next to the fixed-configuration curve at its FLOPs. Each
router starts from a fresh (seeded) initialisation, so even the first row differs from the demo's own router.

Usage: python scripts/policy_label_rules.py DEMO_DIR   (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from visor.demo.pipeline import SUITE, VARIANTS, demo_threshold
from visor.demo.report import router_against_fixed_curve
from visor.flops import router_flops
from visor import VisorForConditionalGeneration
from visor.modeling.router import ConfigurationRouter
from visor.policy.api import full_model_flops, label_synthetic
from visor.policy.labels import LABEL_RULES, LabelTable
from visor.policy.report import policy_report
from visor.policy.training import train_router

MODES = ("multilabel", "softmax")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", type=Path, help="output folder of a finished `visor demo` run")
    args = parser.parse_args()
    plan = json.loads((args.demo_dir / "plan.json").read_text())
    model = VisorForConditionalGeneration.from_pretrained(args.demo_dir / "universal" / "model",
                                                         attn_implementation="eager").eval()
    tables = {split: LabelTable.load(args.demo_dir / "policy" / f"labels-{split}.safetensors")
              for split in ("train", "validation", "test")}
    tables["variants"] = label_synthetic(model, "test", plan["test_per_task"], seed=plan["seed"], suite=VARIANTS,
                                         show_progress=False)
    cost = router_flops(model.config)
    print(f"{args.demo_dir}: router accuracy vs the fixed curve at its FLOPs (test = {SUITE} test split, "
          f"variants = {VARIANTS})")
    for rule in LABEL_RULES:
        for mode in MODES:
            torch.manual_seed(plan["seed"])
            router = ConfigurationRouter.for_config(model.config, mode)
            train_router(router, tables["train"], rule=rule, steps=plan["router_steps"], seed=plan["seed"])
            threshold, _, _ = demo_threshold(model, router, tables["validation"])
            cells = []
            for split in ("test", "variants"):
                report = policy_report(router, tables[split], threshold, cost, full_model_flops(model, tables[split]))
                for group, (row, curve) in router_against_fixed_curve(report["rows"]).items():
                    cells.append(f"{split} {group} {row['accuracy']:.2f} vs {curve:.2f} at {row['savings']:.2f}x")
            print(f"{rule:<11} {mode:<10} τ={threshold:.8g} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

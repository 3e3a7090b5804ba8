"""`visor analyze`: where does a full model need vision? The four analyses and a proposed VISOR placement."""

from __future__ import annotations

import argparse
from pathlib import Path

from visor.analysis.run import AnalysisPlan, analyze
from visor.cli import comma_separated, command


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="attention share, CKA drift, layer sensitivity and a measured CA/SA placement",
        description=__doc__,
    )
    parser.add_argument("--model", required=True, type=Path, help="a full LLaVA-OV checkpoint folder")
    parser.add_argument("--data", required=True, help="data spec, e.g. synthetic@demo")
    parser.add_argument("--output", required=True, type=Path, help="folder for the JSON files and plots")
    parser.add_argument("--per-task", type=int, default=AnalysisPlan.per_task, help="prompts per task and split")
    parser.add_argument("--seed", type=int, default=AnalysisPlan.seed)
    parser.add_argument("--batch-size", type=int, default=AnalysisPlan.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=AnalysisPlan.max_new_tokens)
    parser.add_argument("--span-lengths", type=comma_separated(), default=None,
                        help="comma-separated blind-span lengths for the sensitivity sweep (default all)")
    parser.add_argument("--train-steps", type=comma_separated(), default=None, metavar="STAGE1,UNIVERSAL",
                        help="also train the proposed and the default schedule alike (visor-stage1 then "
                             "visor-universal steps) and compare them at equal FLOPs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    command(parser, _command, output="folder")


def _command(args: argparse.Namespace) -> int:

    plan = AnalysisPlan(per_task=args.per_task, seed=args.seed, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, span_lengths=args.span_lengths,
                        train_steps=args.train_steps)
    summary = analyze(args.model, args.data, args.output, plan, progress=not args.no_progress)
    print(f"layers by question->image attention share: {summary['layers_by_image_share']}")
    print(f"layers by image-token drift (1 - CKA):      {summary['layers_by_drift']}")
    print(f"layers by single-layer blind drop:          {summary['layers_by_single_layer_drop']}")
    print(f"proposed: CA {summary['proposed']['cross_attention_layers']}, "
          f"SA candidates {summary['proposed']['self_attention_layers']}")
    print(f"default:  CA {summary['default']['cross_attention_layers']}, "
          f"SA candidates {summary['default']['self_attention_layers']}")
    for row in summary["equal_flops"]:
        cells = ", ".join(f"{split.removesuffix('_accuracy')} {values['proposed']:.1f} vs {values['default']:.1f}"
                          f" (sign test p={values['sign_test_p']:.2f})"
                          for split, values in row.items() if split.endswith("_accuracy"))
        print(f"configuration {row['configuration']} (proposed vs default, proxy accuracy %): {cells}")
    for row in summary.get("trained_equal_flops", []):
        cells = ", ".join(f"{split} {values['proposed']:.1f} vs {values['default']:.1f} "
                          f"(sign test p={values['sign_test_p']:.2f})"
                          for split, values in row.items() if split != "configuration")
        print(f"configuration {row['configuration']} (proposed vs default, trained accuracy %): {cells}")
    print(f"wrote {args.output}")
    return 0

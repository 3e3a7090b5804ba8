"""`visor demo`: the paper's central claim, reproduced end to end on this CPU from a shipped tiny model.

Starting from a small pretrained full LVLM (`checkpoint/`, trained from scratch by the command in its
TRAINING.md; `checkpoint-two-hop/` for `--suite two-hop`), the demo converts it to VISOR (stage 1, then
universal training), labels every configuration and trains and calibrates the policy, applies every
token-reduction baseline to the full model, and evaluates all of them on held-out test data of every task of
the `demo` suite (`visor.data.suites`; `--suite` picks another). Outputs, in `--output` (default `runs/demo`): `report/results.json`, `report/report.md`,
`report/pareto.png`, and a printed summary; see `visor.demo.pipeline` for the stages and how they resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visor.cli import comma_separated, command, key_value_heads, quantile
from visor.config import ROUTER_MODES
from visor.demo.pipeline import STAGES, SUITE_DEFAULTS, Demo, DemoPlan


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="reproduce VISOR's central claim on the built-in tiny model (about 10 min on 2 cores)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test scale: a few training steps and samples (about 3 min; numbers meaningless)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder and redo every stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, data and policy (default 0)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="the full model to start from, of any supported family (default: the tiny LLaVA-OV "
                             "model shipped for the suite)")
    parser.add_argument("--suite", default=DemoPlan.suite, metavar="NAME",
                        help="what every system is scored on (default %(default)s); two-hop adds key_digit, the digit "
                             "in a key circle's colour, and brings its own shipped full model and the defaults below; "
                             "video scores clips against the video baselines (frame subsampling, EVS-style pruning, "
                             "video pooling) and brings its defaults, but no full model is shipped for it yet (other "
                             "suites of `visor.data.suites`, and video, need --checkpoint)")
    parser.add_argument("--training-data", default=None, metavar="SPEC",
                        help="what the conversion trains on, a `visor train --data` spec (default: the mix the "
                             f"suite's shipped model was trained on last; for demo: {DemoPlan.training_data})")
    parser.add_argument("--variants", default=None, metavar="NAME",
                        help="held-out task variants the policy is also reported on (default: the suite's, "
                             "demo-variants, two-hop-variants or video-variants)")
    parser.add_argument("--freeze-vision-tower", default=None, action=argparse.BooleanOptionalAction,
                        help="keep the vision tower fixed in universal training, so that what a task needs beyond its "
                             "features is computed where VISOR's configurations differ (default: only for two-hop, "
                             "whose full model learned key_digit that way)")
    parser.add_argument("--cross-attention-layers", type=comma_separated(int, "layer indices"), default=None, metavar="I,J",
                        help="VISOR's CA layers (default: evenly spread, [0, 3] on the shipped 6-layer model)")
    parser.add_argument("--self-attention-layers", type=comma_separated(int, "layer indices"), default=None, metavar="I,J",
                        help="VISOR's ordered SA candidates (default: evenly spread, [1, 4] on the shipped model)")
    parser.add_argument("--cross-attention-heads", type=key_value_heads, default=DemoPlan.cross_attention_key_value_heads,
                        metavar="N|host",
                        help=f"key/value heads of each CA block (default {DemoPlan.cross_attention_key_value_heads}: "
                             "half the cost of projecting the visual tokens; 'host' keeps the host layer's, 2 here)")
    parser.add_argument("--router-mode", choices=ROUTER_MODES, default=DemoPlan.router_mode,
                        help="the router's objective (default %(default)s, the paper's: one distribution over "
                             "configurations trained on the cheapest good one; multilabel: one probability per "
                             "configuration)")
    parser.add_argument("--novelty-quantile", type=quantile, default=DemoPlan.novelty_quantile, metavar="Q",
                        help="give the router a novelty guard: inputs scoring above this quantile of its training "
                             "samples skip the cheapest configuration (e.g. 0.98: 2%% false alarms on data like "
                             "them; default: no guard, as it lost answers on the demo's held-out variants)")
    parser.add_argument("--max-loss", type=float, default=None, metavar="EPS",
                        help="the budget with a guarantee, reported next to the policy: the cheapest τ certified to "
                             "lose at most EPS accuracy (a fraction) against the full model (default "
                             f"{DemoPlan.max_loss}; {DemoPlan.quick().max_loss} with --quick, whose validation split is small)")
    parser.add_argument("--confidence", type=float, default=DemoPlan.confidence, metavar="1-DELTA",
                        help="the probability, over the validation split's draw, that the loss stays within EPS "
                             "(default %(default)s)")
    parser.add_argument("--trained-baselines", action="store_true",
                        help="also train the equal-training-budget control (the full model fine-tuned for as many "
                             "steps as VISOR's conversion, on the same data) and report it; adds to a finished run")
    parser.add_argument("--threads", type=int, default=DemoPlan.num_threads,
                        help=f"CPU threads (default {DemoPlan.num_threads}; use 1 when other jobs share the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    command(parser, _main, output="folder")


def _main(args) -> int:
    given = dict(training_data=args.training_data, variants=args.variants, freeze_vision_tower=args.freeze_vision_tower,
                 max_loss=args.max_loss)
    plan = (DemoPlan.quick if args.quick else DemoPlan)(
        seed=args.seed, checkpoint=args.checkpoint, num_threads=args.threads, suite=args.suite,
        cross_attention_layers=args.cross_attention_layers, self_attention_layers=args.self_attention_layers,
        cross_attention_key_value_heads=args.cross_attention_heads, novelty_quantile=args.novelty_quantile,
        router_mode=args.router_mode, confidence=args.confidence,
        **(SUITE_DEFAULTS.get(args.suite, {}) | {name: value for name, value in given.items() if value is not None}))
    Demo(Path(args.output), plan, progress=not args.no_progress, trained_baselines=args.trained_baselines).run(
        fresh=args.fresh)
    return 0


__all__ = ["Demo", "DemoPlan", "STAGES", "register"]

"""`visor policy label | train | calibrate | report`: the policy pipeline, a few lines each over `visor.policy`.

    visor policy label     --model runs/universal/model --split train --per-task 200 --output labels-train.safetensors
    visor policy label     --model runs/universal/model --split validation --per-task 100 --output labels-val.safetensors
    visor policy train     --model runs/universal/model --labels labels-train.safetensors --output runs/policy
    visor policy calibrate --model runs/policy --labels labels-val.safetensors --target-flops 2e8
    visor policy calibrate --model runs/policy --labels labels-val.safetensors --max-loss 0.01 --confidence 0.9
    visor policy report    --model runs/policy --labels labels-test.safetensors --output runs/policy/report

Labels come from the built-in synthetic suite's splits (seeds are disjoint by split, see `visor.data`).
`label --reference-model DIR` also scores the stock model the VISOR model came from, so that `--max-loss`
bounds the loss against it rather than against the largest configuration (`visor.policy.guarantee`).
"""

from __future__ import annotations

from pathlib import Path

from visor.cli import command, quantile
from visor.convert import save_next_to_processor
from visor.files import write_text
from visor.config import ROUTER_MODES
from visor.modeling.novelty import DEFAULT_QUANTILE

DEFAULT_CONFIDENCE = 0.9


def register(subparsers) -> None:
    policy = subparsers.add_parser("policy", help="label configurations, train and calibrate the router, report")
    actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")

    label = actions.add_parser("label", help="run every configuration on a split and score it")
    label.add_argument("--model", required=True, metavar="DIR", help="a universal VISOR checkpoint")
    label.add_argument("--split", default="train", choices=("train", "validation", "test"))
    label.add_argument("--per-task", type=int, default=100, help="samples per task (default 100)")
    label.add_argument("--tasks", default=None, help="comma-separated task names (default: every task)")
    label.add_argument("--suite", default="standard", help="synthetic suite: standard (default) or demo")
    label.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    label.add_argument("--batch-size", type=int, default=32)
    label.add_argument("--reference-model", metavar="DIR", default=None,
                       help="a stock model (the one the VISOR model was converted from) scored on the same samples: "
                            "what calibrate --max-loss measures the loss against (default: the largest configuration)")
    label.add_argument("--output", required=True, metavar="FILE.safetensors")
    command(label, run_label, output="file")

    train = actions.add_parser("train", help="fit the router on a label table and save the model with it")
    train.add_argument("--model", required=True, metavar="DIR")
    train.add_argument("--labels", required=True, metavar="FILE")
    train.add_argument("--mode", choices=ROUTER_MODES, default=None,
                       help="softmax: the paper's cheapest-good cross-entropy (the config's default); multilabel: "
                            "P(good) per configuration; default: the model's router_mode")
    train.add_argument("--rule", choices=("probability", "correct"), default="probability",
                       help="score the 99%% rule is applied to: answer probability (default) or correctness")
    train.add_argument("--novelty-quantile", type=quantile, default=None, metavar="Q",
                       help="also fit a novelty guard: inputs scoring above this quantile of the labelled samples "
                            f"skip the cheapest configuration (e.g. {DEFAULT_QUANTILE}; default: no guard)")
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", required=True, metavar="DIR")
    command(train, run_train, output="model", reads=("model", "labels"))

    calibrate = actions.add_parser("calibrate", help="pick τ on held-out labels for a FLOPs or accuracy target")
    calibrate.add_argument("--model", required=True, metavar="DIR", help="model with a trained router (updated in place)")
    calibrate.add_argument("--labels", required=True, metavar="FILE", help="held-out label table")
    target = calibrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="mean LLM prefill FLOPs per sample to stay within")
    target.add_argument("--target-accuracy", type=float, help="accuracy (%%) to reach at the least FLOPs")
    target.add_argument("--max-loss", type=float, metavar="EPS",
                        help="the cheapest τ certified to lose at most EPS accuracy (a fraction: 0.01 is one point) "
                             "against the labels' reference, with probability --confidence; the labels must be "
                             "drawn like the data the model will see")
    calibrate.add_argument("--confidence", type=float, default=None, metavar="1-DELTA",
                           help=f"with --max-loss: the probability the loss stays within EPS (default {DEFAULT_CONFIDENCE})")
    command(calibrate, run_calibrate)

    report = actions.add_parser("report", help="accuracy, FLOPs, savings and histograms: router, fixed, oracle")
    report.add_argument("--model", required=True, metavar="DIR")
    report.add_argument("--labels", required=True, metavar="FILE", help="test label table")
    report.add_argument("--tau", type=float, default=None, help="threshold (default: the model's calibrated τ)")
    report.add_argument("--output", required=True, metavar="DIR")
    command(report, run_report, output="folder")


def _model_and_labels(args, trained: bool = True):
    """The model and a label table made for it; `trained`: the router must have been trained already."""
    from visor.config import UNTRAINED_ROUTER
    from visor.policy.api import load_labels_for, load_model

    model = load_model(args.model)
    if trained and not model.router.trained:
        raise ValueError(f"{args.model}: {UNTRAINED_ROUTER}")
    return model, load_labels_for(model, args.labels)


def run_label(args) -> int:
    from visor.policy.api import label_synthetic, load_model, load_reference

    model = load_model(args.model)
    reference = None if args.reference_model is None else load_reference(args.reference_model, model)
    tasks = args.tasks.split(",") if args.tasks else None
    table = label_synthetic(model, args.split, args.per_task, seed=args.seed, tasks=tasks, batch_size=args.batch_size,
                            suite=args.suite, reference_model=reference,
                            reference_name=f"the stock model {args.reference_model}")
    table.save(args.output)
    print(f"labelled {len(table)} samples x {table.num_configurations} configurations -> {args.output}")
    if reference is not None:
        print(f"{table.reference_name} answers {100 * float(table.reference.float().mean()):.1f}% of them, the largest "
              f"configuration {100 * float(table.correct[:, -1].float().mean()):.1f}%")
    return 0


def run_train(args) -> int:
    from visor.policy.training import fit_novelty_guard, train_router

    model, table = _model_and_labels(args, trained=False)
    if args.mode:
        model.configure_router(mode=args.mode)
    losses = train_router(model.router, table, rule=args.rule, steps=args.steps, seed=args.seed)
    model.config.router_training["labels"] = str(args.labels)
    if args.novelty_quantile is not None:
        fit_novelty_guard(model, table, args.novelty_quantile, seed=args.seed)
    save_next_to_processor(model, args.output, args.model)
    print(f"router ({model.router.mode}, rule {args.rule}) loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved {args.output}")
    if args.novelty_quantile is not None:
        print(f"novelty guard: {model.config.router_novelty_references} reference features, κ = "
              f"{model.config.router_novelty_threshold:.4g} (the {args.novelty_quantile:g} quantile of their scores)")
    needs_more = float((~table.good(args.rule)[:, 0]).float().mean())
    print(f"the cheapest configuration (0) is not good for {100 * needs_more:.1f}% of the {len(table)} "
          "labelled samples: the only ones the router can learn to spend on")
    return 0


def run_calibrate(args) -> int:
    from visor.flops import router_flops
    from visor.policy.calibration import calibrate
    from visor.policy.guarantee import certify, check_risk

    if args.max_loss is None and args.confidence is not None:
        raise ValueError("--confidence goes with --max-loss")
    confidence = DEFAULT_CONFIDENCE if args.confidence is None else args.confidence
    if args.max_loss is not None:
        check_risk(args.max_loss, confidence)
    model, table = _model_and_labels(args)
    if args.max_loss is not None:
        guarantee, outcome = certify(model.router, table, router_flops(model.config), args.max_loss, confidence)
        threshold = guarantee.threshold
        model.configure_router(threshold=threshold, guarantee=guarantee.to_dict())
        print(guarantee.describe())
    else:
        threshold, outcome = calibrate(model.router, table, router_flops(model.config),
                                       target_flops=args.target_flops, target_accuracy=args.target_accuracy)
        model.configure_router(threshold=threshold)
    write_text(Path(args.model) / "config.json", model.config.to_json_string())  # the weights are unchanged
    print(f"τ = {threshold:.8g}: held-out accuracy {outcome.accuracy:.1f}%, "
          f"mean LLM prefill {outcome.mean_flops / 1e9:.4f} GFLOPs; saved in {args.model}")
    return 0


def run_report(args) -> int:
    from visor.flops import router_flops
    from visor.modeling.router import check_threshold
    from visor.policy.api import full_model_flops
    from visor.policy.guarantee import guarantee_at
    from visor.policy.report import markdown_table, policy_report, write_report

    model, table = _model_and_labels(args)
    threshold = check_threshold(args.tau) if args.tau is not None else model.router.threshold
    report = policy_report(model.router, table, threshold, router_flops(model.config), full_model_flops(model, table),
                           guarantee_at(model.config, threshold))
    paths = write_report(report, args.output)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0

"""`visor evaluate`: accuracy per task of a checkpoint on held-out data, in every configuration asked for.

    visor evaluate --model runs/mine-universal/model --data llava:my-data/data.json
    visor evaluate --model DIR --data hf:my-chats --split validation --configurations 0,2 --output accuracy.json

The data spec is `visor train`'s (`--data`, `visor.training.data`); conversation data holds out its test and
validation records by a fixed permutation, so `--split test` reads records that training never saw. Answers are
greedy and scored by exact match on each record's last answer (`visor.evaluation.scoring`). A VISOR model is
evaluated in each configuration (default: all of them), a stock model as it is.
"""

from __future__ import annotations

import argparse

from visor.cli import comma_separated, command


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="accuracy per task on held-out data, per configuration",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder with its tokenizer")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="as for visor train: synthetic@SUITE, llava:FILE.json, hf:DIR or module.path:factory")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="llava data: the folder its image paths are relative to (default the JSON's folder)")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--per-task", type=int, default=100, help="samples per task at most (default 100)")
    parser.add_argument("--configurations", type=comma_separated(), default=None,
                        help="VISOR configuration indices (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the data's seed (synthetic suites draw samples by it)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="also write the accuracies here")
    command(parser, _main)


def evaluate_checkpoint(model_dir, data: str, split: str = "test", per_task: int = 100,
                        configurations: tuple[int, ...] | None = None, batch_size: int = 16, max_new_tokens: int = 8,
                        image_root=None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{configuration ("full" for a stock model, else its index): {task: accuracy %, "mean": ...}}."""
    from visor.evaluation.scoring import evaluate
    from visor.training.data import resolve_data
    from visor.training.recipes import is_visor, load_checkpoint
    from visor.training.settings import TrainingSettings

    for name, value in (("per_task", per_task), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    model = load_checkpoint(model_dir).eval()
    if not is_visor(model):
        if configurations is not None:
            raise ValueError(f"{model_dir} is a stock model: it has no configurations to choose")
        indices = [None]
    else:
        count = len(model.config.configurations)
        indices = list(range(count)) if configurations is None else list(configurations)
        missing = [index for index in indices if not 0 <= index < count]
        if missing:
            raise ValueError(f"configurations {missing} do not exist: the model has 0..{count - 1}")
    source = resolve_data(data, model.config, seed, TrainingSettings(image_root=image_root), model_dir=model_dir)
    options = dict(split=split, per_task=per_task, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {"full" if index is None else str(index): evaluate(model, source, configuration=index, **options)
            for index in indices}


def _main(args) -> int:
    from visor.files import check_output, write_json

    if args.output is not None:
        check_output(args.output, "file")
    accuracy = evaluate_checkpoint(args.model, args.data, args.split, args.per_task, args.configurations,
                                   args.batch_size, args.max_new_tokens, args.image_root, args.seed)
    tasks = list(next(iter(accuracy.values())))
    width = max(len(task) for task in tasks) + 2
    print(f"{'configuration':<15}" + "".join(f"{task:>{width}}" for task in tasks))
    for configuration, scores in accuracy.items():
        print(f"{configuration:<15}" + "".join(f"{scores[task]:>{width}.1f}" for task in tasks))
    if args.output is not None:
        write_json(args.output, accuracy)
        print(f"wrote {args.output}")
    return 0

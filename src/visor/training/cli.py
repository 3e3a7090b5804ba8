"""`visor train …` and `visor configurations search …`: a few lines each over `visor.training`.

    visor train --recipe full --data synthetic --model tiny --output runs/full
    visor train --recipe visor-stage1 --data synthetic --init runs/full/model --output runs/stage1
    visor configurations search --model runs/stage1/model --data synthetic --output runs/searched
    visor train --recipe visor-universal --data synthetic --init runs/searched --output runs/universal

Every hyper-parameter is a field of `TrainingSettings` (settings.py), set from `--config FILE.yaml` and/or
`--set key=value`. Multi-process: `accelerate launch --num_processes N -m visor.training train …`.
Bad input (unknown recipe, missing or corrupt checkpoint, a data spec that matches nothing, configurations
that do not fit the model) stops with a one-line error and exit status 2 before training starts.
"""

from __future__ import annotations

import argparse
import json

from visor.cli import command, run_command


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="training settings (a mapping of TrainingSettings keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one training setting (repeatable), e.g. --set learning_rate=3e-4")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--image-root", metavar="DIR", default=None,
                        help="--data llava:FILE.json: the folder its image paths are relative to (default: the "
                             "file's folder)")
    parser.add_argument("--images-outside-root", action="store_const", const=True, default=None,
                        help="--data llava:FILE.json: let image paths lead out of the image root (.., absolute "
                             "paths, symbolic links); by default a record whose image does is broken")


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train the full model, VISOR stage 1 or universal VISOR",
        description="Train with one of the recipes full, visor-stage1, visor-universal (see visor.training).",
    )
    train.add_argument("--recipe", required=True, help="full | visor-stage1 | visor-universal")
    train.add_argument("--data", required=True, help="'synthetic' (full difficulty), 'synthetic@demo' (the demo's suite), "
                       "'synthetic:TASK,...' (some tasks), 'llava:FILE.json' (LLaVA-format conversations), "
                       "'hf:DIR' (a datasets folder of chat messages and images) or 'module.path:factory'")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--init", metavar="PATH", help="start from this checkpoint folder (save_pretrained output)")
    source.add_argument("--model", metavar="PRESET", help="start from scratch with a preset (e.g. tiny)")
    train.add_argument("--output", required=True, metavar="DIR")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--save-every", type=int, default=None)
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    _add_settings_arguments(train)
    command(train, run_train, output="folder", reads=("init",))

    configurations = subparsers.add_parser("configurations", help="feasible VISOR configurations")
    actions = configurations.add_subparsers(dest="action", required=True, metavar="ACTION")
    search = actions.add_parser(
        "search", help="evaluate SA subsets after stage 1 and keep the Pareto-good ones",
        description="Evaluate subsets of the SA candidates on validation data (exhaustive when small, else greedy), "
                    "keep the accuracy-vs-LLM-prefill-FLOPs Pareto front and save the model with them as its "
                    "configurations.",
    )
    search.add_argument("--model", required=True, metavar="DIR", help="a VISOR checkpoint (after stage 1)")
    search.add_argument("--data", required=True)
    search.add_argument("--output", required=True, metavar="DIR")
    search.add_argument("--keep-nested", action="store_true",
                        help="also keep the nested default configurations (prefixes of the SA candidates)")
    search.add_argument("--max-exhaustive", type=int, default=6,
                        help="search every subset when there are at most this many SA candidates, else greedily")
    _add_settings_arguments(search)
    command(search, run_search, output="model", reads=("model",))


def _settings(args, recipe: str, **explicit):
    from visor.training.settings import load_settings

    return load_settings(recipe, args.config, args.overrides, seed=args.seed, image_root=args.image_root,
                         images_outside_root=args.images_outside_root, **explicit)


def run_train(args) -> int:
    from visor.training.engine import train
    from visor.training.recipes import check_recipe

    check_recipe(args.recipe)
    settings = _settings(args, args.recipe, max_steps=args.max_steps, save_every=args.save_every)
    summary = train(args.recipe, args.data, args.output, settings, init=args.init, model_preset=args.model,
                    resume=args.resume, progress=not args.no_progress)
    keys = ("steps", "wall_seconds_this_run", "visits", "validation", "skipped_records")
    print(json.dumps({key: summary.get(key) for key in keys}, indent=2))
    return 0


def run_search(args) -> int:
    from visor.training.search import search_configurations

    settings = _settings(args, "visor-stage1")
    report = search_configurations(args.model, args.data, args.output, settings, keep_nested=args.keep_nested,
                                   max_exhaustive=args.max_exhaustive)
    print(json.dumps({"configurations": report["configurations"], "cost": report["cost_measure"]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m visor.training …`: the same subcommands without the rest of the `visor` command."""
    parser = argparse.ArgumentParser(prog="python -m visor.training")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser.parse_args(argv))

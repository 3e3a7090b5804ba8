"""The `visor` command: a thin layer over the library. Each subcommand lives next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

from visor.files import check_output

# Modules that contribute a subcommand through `register(subparsers)`.
_SUBCOMMAND_MODULES = (
    "visor.demo",
    "visor.convert",
    "visor.generate",
    "visor.evaluate",
    "visor.analysis.cli",
    "visor.bench",
    "visor.training.cli",
    "visor.data.cli",
    "visor.policy.cli",
    "visor.integrations.vllm.cli",
)


def comma_separated(convert=int, what: str = "integers"):
    """An argparse `type` for lists like "1,2,3" → (1, 2, 3), with an error that quotes the bad text."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def quantile(text: str) -> float:
    """An argparse `type` for a quantile, a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a quantile in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"the quantile must lie in (0, 1], got {value}")
    return value


def key_value_heads(value: str) -> int | None:
    """An argparse `type` for a CA block's key/value heads: a positive number, or "host" (None: the host layer's)."""
    if value == "host":
        return None
    try:
        heads = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of heads or 'host', got {value!r}") from None
    if heads < 1:
        raise argparse.ArgumentTypeError(f"the number of heads must be positive, got {heads}")
    return heads


def command(parser: argparse.ArgumentParser, run, output: str | None = None, reads: tuple[str, ...] = ()) -> None:
    """Make `run(args)` what `parser`'s (sub)command does; `run_command` turns its errors into one line.
    `output` ("folder", "file" or "model"): what `--output` names, checked (`visor.files.check_output`) before
    `run` starts, and never one of the paths the options `reads` names (argument names, e.g. "model") nor a
    folder that holds one."""
    parser.set_defaults(func=run, prog=parser.prog, output_kind=output, output_reads=reads)


def run_command(args: argparse.Namespace) -> int:
    """The chosen command's exit code; a ValueError or OSError (bad input) is one line on stderr and exit code 2.
    transformers' per-file loading and saving bars are off: they would bury each command's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if args.output_kind is not None:
            check_output(args.output, args.output_kind, reads=[getattr(args, name) for name in args.output_reads])
        return int(args.func(args) or 0)
    except (ValueError, OSError) as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visor",
        description="VISOR: sparse, per-sample vision-language interaction for LLaVA-OneVision-style models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""The `visor` command: a thin layer over the library. Each subcommand lives next to the code it drives."""

from __future__ import annotations

import argparse
import importlib

# Modules that contribute a subcommand through `register(subparsers)`.
_SUBCOMMAND_MODULES = (
    "visor.demo",
    "visor.generate",
    "visor.analysis.cli",
    "visor.bench",
    "visor.training.cli",
    "visor.data.cli",
    "visor.policy.cli",
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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

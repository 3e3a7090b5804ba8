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

"""The ``stabilitylab`` command. Each subcommand lives beside the code it drives and registers itself
through ``add_parser(subparsers)``; this file only lists them."""

from __future__ import annotations

import argparse
import sys

from stabilitylab.analysis import cli as analyze_cli
from stabilitylab.analysis import predict_cli
from stabilitylab.studies import demo, warnings_bench
from stabilitylab.studies.reproduce import cli as reproduce_cli
from stabilitylab.sweeps import cli as sweep_cli

#: Modules that define ``add_parser(subparsers)``; each sets ``func`` on its parser (``--help`` lists them
#: in this order).
COMMAND_MODULES = [demo, sweep_cli, analyze_cli, predict_cli, reproduce_cli, warnings_bench]


def build_parser() -> argparse.ArgumentParser:
    """The ``stabilitylab`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="stabilitylab",
        description="Diagnose, predict and mitigate Transformer training instabilities.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"stabilitylab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

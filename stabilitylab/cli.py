"""The ``stabilitylab`` command. Each subcommand lives beside the code it drives and registers itself
through ``add_parser(subparsers)``; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that define ``add_parser(subparsers)``; each sets ``func`` on its parser.
COMMAND_MODULES = [
    "stabilitylab.demo",
    "stabilitylab.sweeps.cli",
    "stabilitylab.analysis.cli",
    "stabilitylab.analysis.predict_cli",
    "stabilitylab.reproduce",
    "stabilitylab.studies.warnings_bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabilitylab",
        description="Diagnose, predict and mitigate Transformer training instabilities.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
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

"""The `attrib` parser and entry point: each command group registers its own sub-commands."""

from __future__ import annotations

import argparse
import sys

from app import validate_cli
from app.cli import engine, operations, serve
from app.cli.common import CLIError
from app.runtime import tune_malloc
from models.data import DatasetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attrib",
        description="Attributable diffusion models (encoded ensembles): train an ensemble, "
                    "generate from it, and attribute each sample to its training data; and the "
                    "service that does the same over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    engine.add_parsers(sub)
    validate_cli.add_parser(sub)
    operations.add_parsers(sub)
    serve.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    try:
        args.func(args)
    except (CLIError, DatasetError) as exc:
        print(f"attrib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0

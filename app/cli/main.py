"""The `attrib` parser and entry point: each command group registers its own sub-commands."""

from __future__ import annotations

import argparse
import sys

from app.cli.common import CLIError
from app.cli.parsers import (
    add_engine_parsers,
    add_operations_parsers,
    add_serve_parsers,
    add_validate_parsers,
)
from app.runtime import tune_malloc
from models.errors import DatasetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attrib",
        description="Attributable diffusion models (encoded ensembles): train an ensemble, "
                    "generate from it, and attribute each sample to its training data; and the "
                    "service that does the same over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_engine_parsers(sub)
    add_validate_parsers(sub)
    add_operations_parsers(sub)
    add_serve_parsers(sub)
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

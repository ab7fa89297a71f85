"""`attrib validate classes|fidelity|copies`: acceptance evidence for the attributions.

The flags are the fields of the experiment's config (experiments/): each command turns its
flags into that config, runs the experiment (which trains the ensemble it needs, or takes
``--checkpoint``) and prints its summary (or its report with ``--json``); ``report.json`` and
PNG figures go into ``--out DIR``, with a progress bar per stage on stderr. Defaults are the
configs' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from app.cli.common import CLIError, device, log
from experiments import CONFIGS, AnyConfig, run
from experiments.common import ExperimentError
from experiments.configs import (
    ENSEMBLE_OPTIONS,
    ExperimentConfig,
)


class _Progress:
    """One tqdm bar per stage on stderr (none with --json)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]


def cmd_validate(args: argparse.Namespace) -> None:
    config = config_of(args)
    out = Path(args.out)
    try:
        report = run(config, out, _Progress(args.json), device=device(args.device), log=log)
    except ExperimentError as exc:
        raise CLIError(str(exc)) from exc
    print(json.dumps(report.to_json()) if args.json else f"{report.headline}\nwrote {out / 'report.json'}")


def config_of(args: argparse.Namespace) -> AnyConfig:
    """The config the parsed flags of `attrib validate EXPERIMENT` stand for."""
    cls = CONFIGS[args.experiment]
    names = set(cls.model_fields) | set(ENSEMBLE_OPTIONS)
    options = {name: value for name, value in vars(args).items() if name in names}
    if "no_lpips" in vars(args):
        options["lpips"] = not args.no_lpips
    if "sources" in options:
        options["sources"] = _sources(args.sources)
    try:
        return cls.from_options(options)
    except ValidationError as exc:
        # one line per flag; a union field (--sources N|all) lists what each branch wanted
        wanted: dict[str, list[str]] = {}
        for error in exc.errors():
            flag = next((str(p) for p in reversed(error["loc"]) if str(p) in names), str(error["loc"][0]))
            wanted.setdefault(flag, []).append(error["msg"])
        raise CLIError("; ".join(f"--{flag.replace('_', '-')}: {' or '.join(msgs)}"
                                 for flag, msgs in wanted.items())) from None


def _sources(text: str) -> int | Literal["all"]:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"--sources: expected 'all' or a positive integer, got {text!r}") from None


def _default(cls: type[ExperimentConfig], name: str) -> Any:
    return cls.model_fields[name].default

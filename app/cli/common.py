"""What every `attrib` command needs: its error type, the device, logging, output, loading
data and ensembles, the owners CSV, and the flags shared by several commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from models.ensemble import Ensemble

DEFAULT_CKPT = "runs/digits.pt"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def device(name: str) -> torch.device:
    """``--device``: auto, cpu, cuda or cuda:N, refusing CUDA where there is none."""
    from models.ensemble import resolve_device  # torch: only the commands that compute load it

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise CLIError(f"--device {name}: {exc}") from exc


def log(msg: str) -> None:
    """Progress and notes: stderr, so that stdout holds only the command's own output."""
    print(msg, file=sys.stderr, flush=True)


def emit(as_json: bool, payload: dict[str, Any], human: str) -> None:
    """The command's result on stdout: one JSON object (``--json``) or a line for people."""
    print(json.dumps(payload) if as_json else human, flush=True)


def load_ensemble(path: str | Path, on: torch.device) -> Ensemble:
    from models.ensemble import Ensemble

    try:
        return Ensemble.load(path).for_inference(on)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def sampling_steps(requested: int | None, ens: Ensemble) -> int:
    """``--steps``: the ensemble's T when not given; fewer are respaced, more are refused."""
    try:
        return ens.schedule.sampling_steps(requested)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from exc


def read_owners_csv(path: str | Path, num_items: int) -> list[str]:
    """A CSV of `item_index,owner` lines (header optional) -> one owner per item."""
    owners: list[str | None] = [None] * num_items
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = [p.strip() for p in line.split(",")]
        if not line.strip() or (lineno == 1 and not parts[0].isdigit()):
            continue
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1]:
            raise CLIError(f"{path}:{lineno}: expected 'item_index,owner', got {line!r}")
        item = int(parts[0])
        if item >= num_items:
            raise CLIError(f"{path}:{lineno}: item {item} out of range (dataset has {num_items})")
        owners[item] = parts[1]
    missing = [i for i, o in enumerate(owners) if o is None]
    if missing:
        raise CLIError(f"{path}: no owner for {len(missing)} items (first: item {missing[0]})")
    return [o for o in owners if o is not None]


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (CUDA when present; default)")

"""`attrib demo-setup`: what `make run` does before serving -- the schema, the digits with demo
rights holders, a trained digits ensemble and an operator key, each only if absent.

Configuration comes from the environment (app/settings.py): nothing set means SQLite and a
filesystem broker under ./data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from sqlalchemy import func, select

from app.auth import create_key
from app.cli.common import emit, log
from app.cli.engine import TrainRequest, train_checkpoint
from app.cli.operations import import_data, owners_by_label, register_checkpoint
from app.db import Database
from app.orm import Dataset, EnsembleRow, TrainingItem
from app.settings import get_settings
from models.ensemble import PRESETS, Ensemble
from models.train import TrainSpec

DEMO_OWNERS = 5  # digits: rights holder i owns the digits 2i and 2i+1


def cmd_demo_setup(args: argparse.Namespace) -> None:
    """Schema, the digits dataset with demo rights holders, a trained digits ensemble, and
    an operator key: each only if absent. Demo keys are kept in <data_dir>/demo-keys.json."""
    from app import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.database_url)
    keys_file = settings.data_dir / "demo-keys.json"
    saved: dict[str, str] = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    db = Database(settings.database_url)
    with db.session() as s:
        have_digits = s.scalar(select(Dataset).where(Dataset.name == "digits")) is not None
    if not have_digits:
        log("importing sklearn digits (1,797 works) with demo rights holders ...")
        _, keys = import_data(settings, "digits", None, 0, "digits",
                              lambda ds: owners_by_label(ds, DEMO_OWNERS))
        saved.update(dict(keys))
    ckpt = settings.checkpoint_dir / f"{args.preset}.pt"
    with db.session() as s:
        registered = s.scalar(select(EnsembleRow).where(EnsembleRow.name == f"digits-{args.preset}"))
    if registered is None:
        if not ckpt.exists() or _unfinished(ckpt, args.preset, args.steps):
            log(f"training the default ensemble into {ckpt} (progress below; Ctrl-C keeps progress) ...")
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for this command's own output
                spec = TrainSpec(data="digits", preset=args.preset, steps=args.steps, checkpoint_every=200)
                train_checkpoint(TrainRequest(out=ckpt, spec=spec, resume=True))
        register_checkpoint(settings, ckpt, f"digits-{args.preset}")
    if "operator" not in saved:
        with db.session() as s:
            _, saved["operator"] = create_key(s, None, name="demo operator")
    keys_file.write_text(json.dumps(saved, indent=2))
    os.chmod(keys_file, 0o600)
    with db.session() as s:
        n_items = s.scalar(select(func.count()).select_from(TrainingItem)) or 0
    db.dispose()
    lines = [f"demo ready: {n_items} training works; keys (demo only, kept in {keys_file}):"]
    lines += [f"  {who:<22} {key}" for who, key in saved.items()]
    emit(args.json, {"keys": saved, "keys_file": str(keys_file)}, "\n".join(lines))


def _unfinished(ckpt: Path, preset: str, steps: int | None) -> bool:
    ens = Ensemble.load(ckpt)
    target = steps if steps is not None else PRESETS[preset].train_steps
    return int((ens.train_state or {}).get("step", 0)) < target

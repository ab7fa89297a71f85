"""`attrib serve|worker|demo-setup`: running the service.

    attrib serve                               API + a worker per queue (embedded default: no servers)
    attrib worker [--queues interactive,long]  a Celery worker (for DATABASE_URL/BROKER_URL setups)
    attrib demo-setup                          what `make run` does before serving

Configuration comes from the environment (app/settings.py): nothing set means SQLite and a
filesystem broker under ./data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.auth import create_key
from app.cli.common import add_json_flag, emit, log, positive_int
from app.cli.engine import TrainRequest, train_checkpoint
from app.cli.operations import import_data, owners_by_label, register_checkpoint
from app.db import Database
from app.orm import Dataset, EnsembleRow, TrainingItem
from app.queue import parse_queues
from app.settings import get_settings
from app.workers import WorkerSpec, exec_worker, serve_workers, start_worker, stop_workers
from models.train import TrainSpec

DEMO_OWNERS = 5  # digits: rights holder i owns the digits 2i and 2i+1


# ------------------------------------------------------------------------ demo setup
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
    from models.ensemble import PRESETS, Ensemble

    ens = Ensemble.load(ckpt)
    target = steps if steps is not None else PRESETS[preset].train_steps
    return int((ens.train_state or {}).get("step", 0)) < target


# ----------------------------------------------------------------------------- serve
def cmd_worker(args: argparse.Namespace) -> None:
    exec_worker(WorkerSpec(tuple(args.queues), args.concurrency, args.threads), args.loglevel)


def _queues(text: str) -> list[str]:
    try:
        return parse_queues(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app import migrate
    from app.main import create_app

    settings = get_settings()
    if settings.embedded_db:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(settings.database_url)
    workers = [start_worker(spec, args.loglevel.upper()) for spec in serve_workers(settings, args.workers)]
    url = f"http://{args.host}:{args.port}"
    processes = args.api_processes or settings.api_processes
    log(f"serving {url} (docs {url}/docs); database {settings.database_url}; broker {settings.broker_url}"
         f"; {processes} API process(es)"
         + (f"; workers: {args.workers} interactive process(es), 1 long" if workers
            else "; no worker (start 'attrib worker')"))
    key = "$OPERATOR_KEY"
    keys_file = settings.data_dir / "demo-keys.json"
    if keys_file.exists():
        key = json.loads(keys_file.read_text()).get("operator", key)
    log(f"try:\n  curl -s -X POST {url}/generate -H 'Authorization: Bearer {key}' "
         "-H 'Content-Type: application/json' -d '{\"seeds\": [0, 1]}'\n"
         f"  curl -s {url}/jobs/<job_id> -H 'Authorization: Bearer {key}'\n"
         f"  curl -s -X POST {url}/validations -H 'Authorization: Bearer {key}' "
         "-H 'Content-Type: application/json' -d '{\"experiment\": \"copies\", \"samples\": 16}'"
         "   (trains its own ensemble: minutes; then GET /validations/<job_id>)")
    # uvicorn re-raises the SIGTERM it shut down on; with the default action the process would
    # die on the spot and leave its worker running. As an exception, the worker is stopped below.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    metrics_dir = None
    try:
        if processes == 1:
            uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.loglevel,
                        access_log=args.access_log)
        else:
            # The processes build the app from the same environment; prometheus_client adds up
            # their metrics through this folder.
            from app import server

            metrics_dir = tempfile.mkdtemp(prefix="attrib-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            server.serve(processes, args.host, args.port, args.loglevel, args.access_log)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        stop_workers(workers, settings)


# ---------------------------------------------------------------------------- parser
def add_parsers(sub: Any) -> None:
    """Register demo-setup, serve and worker on the `attrib` sub-parser set ``sub``."""
    d = sub.add_parser("demo-setup", help="schema, digits with demo rights holders, a trained ensemble, keys")
    d.add_argument("--preset", default="digits", help="network preset of the demo ensemble")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    add_json_flag(d)
    d.set_defaults(func=cmd_demo_setup)

    sv = sub.add_parser("serve", help="serve the HTTP API (and run workers)",
                        description="Embedded default: migrates SQLite under ./data and starts one "
                                    "worker process with the filesystem broker.")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="interactive worker processes to start, besides "
                    "one for the long queue (0: no workers)")
    sv.add_argument("--api-processes", type=positive_int, default=None,
                    help="HTTP server processes (default: ATTRIB_API_PROCESSES, else 1); on a machine "
                         "with spare cores, more serve more requests at once")
    sv.add_argument("--loglevel", default="info")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    sv.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a Celery worker for the configured broker and database")
    w.add_argument("--queues", type=_queues, default=["interactive", "long"],
                   help="queues it takes jobs from, comma-separated: interactive (generate, attribute, "
                        "small batches), long (validations, large batches); default both")
    w.add_argument("--concurrency", type=positive_int, default=1, help="processes (one job each at a time)")
    w.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process (default: ATTRIB_WORKER_THREADS)")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(func=cmd_worker)

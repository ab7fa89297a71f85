"""`attrib serve|worker`: running the service (`demo-setup`, which trains, is in ``demo``).

    attrib serve                               API + a worker per queue (embedded default: no servers)
    attrib worker [--queues interactive,long]  a Celery worker (for DATABASE_URL/BROKER_URL setups)

Configuration comes from the environment (app/settings.py): nothing set means SQLite and a
filesystem broker under ./data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile

from app.cli.common import log
from app.settings import get_settings
from app.workers import WorkerSpec, exec_worker, serve_workers, start_worker, stop_workers


# ----------------------------------------------------------------------------- serve
def cmd_worker(args: argparse.Namespace) -> None:
    exec_worker(WorkerSpec(tuple(args.queues), args.concurrency, args.threads), args.loglevel)


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

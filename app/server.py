"""Several HTTP server processes on one port, each with a listening socket of its own.

uvicorn's own ``--workers`` shares one listening socket between its processes, and an event
loop accepts every pending connection when it wakes: a burst of clients (or one proxy's pool)
can all land in one process while the other idles (measured with ``bench/api.py``: 32
keep-alive clients split 32/0, 22/10 and 12/20 between two processes). With ``SO_REUSEPORT``
the kernel gives each process its own accept queue and spreads connections over them by their
addresses. Where the option does not exist, uvicorn's shared socket is used instead.

The parent only supervises: it starts the processes, starts a new one when one dies, and stops
them all when it is stopped (SIGTERM/SIGINT reach it as SystemExit/KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import time
from multiprocessing.process import BaseProcess

import uvicorn
from prometheus_client import multiprocess

APP = "app.main:create_app"
STARTUP_FAILURE = 3  # uvicorn's exit status when a server could not start


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _serve_one(host: str, port: int, log_level: str, access_log: bool) -> None:
    """One server process (spawned): its own SO_REUSEPORT socket, the app built from the environment."""
    sock = _socket(host, port, reuse_port=True)
    config = uvicorn.Config(APP, factory=True, log_level=log_level, access_log=access_log)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _forget(pid: int | None) -> None:
    """Drop a dead process's live gauges from /metrics (its counters stay: they were counted)."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)


def serve(processes: int, host: str, port: int, log_level: str, access_log: bool) -> None:
    """Serve the app from ``processes`` processes on host:port until stopped."""
    if not hasattr(socket, "SO_REUSEPORT"):
        uvicorn.run(APP, factory=True, workers=processes, host=host, port=port, log_level=log_level,
                    access_log=access_log)
        return
    # A port in use fails here, once, with the OS's message (bound, never listening, so no
    # connection is ever queued on it).
    try:
        _socket(host, port, reuse_port=False).close()
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    ctx = multiprocessing.get_context("spawn")

    def start() -> BaseProcess:
        p = ctx.Process(target=_serve_one, args=(host, port, log_level, access_log), name="attrib-api")
        p.start()
        return p

    procs = [start() for _ in range(processes)]
    try:
        while True:
            time.sleep(0.5)
            for i, p in enumerate(procs):
                if p.exitcode is None:
                    continue
                if p.exitcode == STARTUP_FAILURE:
                    raise SystemExit(f"API process {p.pid} could not start (see the log above)")
                print(f"API process {p.pid} exited with {p.exitcode}; starting another", file=sys.stderr,
                      flush=True)
                _forget(p.pid)
                procs[i] = start()
    finally:
        for p in procs:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 15
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
